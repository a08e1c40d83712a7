"""The supported SGLang range and the adapters for APIs that differ across it, against the
installed SGLang's real objects (CI runs this file under both ends of the range)."""

import re
from pathlib import Path

import pytest
from sglang.srt.server_args import ServerArgs

from sglang_pariskv import plugin, sglang_compat
from sglang_pariskv.sglang_compat import UnsupportedSGLangError

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_sglang_is_in_the_range():
    assert sglang_compat.check_supported() == sglang_compat.installed_version()


def test_pyproject_declares_the_same_range():
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    low, high = sglang_compat.SUPPORTED_RANGE
    assert re.findall(r'"(sglang\b[^"]*)"', deps) == [f"sglang>={low},<={high}"]


@pytest.mark.parametrize("version", ["0.5.17", "0.5.18", "0.5.20", "0.5.23"])
def test_versions_in_the_range_are_accepted(version):
    assert sglang_compat.check_supported(version) == version


@pytest.mark.parametrize("version", ["0.5.16", "0.5.23.post1", "0.5.24", "0.6.0", "nightly"])
def test_versions_outside_the_range_are_refused_in_one_line(version):
    with pytest.raises(UnsupportedSGLangError) as e:
        sglang_compat.check_supported(version)
    msg = str(e.value)
    assert "\n" not in msg and f"SGLang {version} is installed" in msg
    assert "0.5.17 to 0.5.23" in msg and "pip install 'sglang>=0.5.17,<=0.5.23'" in msg


@pytest.fixture
def sglang_0524(monkeypatch):
    monkeypatch.setattr(sglang_compat, "installed_version", lambda: "0.5.24")


@pytest.mark.parametrize("argv", [["--enable-pariskv"], ["--model-path", "m", "--pariskv-topk=64"]])
def test_a_launch_asking_for_pariskv_on_another_sglang_ends_with_one_line(
    sglang_0524, argv, capsys
):
    with pytest.raises(SystemExit) as e:
        sglang_compat.refuse_unsupported_launch(argv)
    assert e.value.code == 2 and e.value.__cause__ is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: sglang-pariskv supports SGLang")
    assert "SGLang 0.5.24 is installed" in err


def test_a_plain_launch_on_another_sglang_runs_without_the_plugin(sglang_0524, capsys):
    assert sglang_compat.refuse_unsupported_launch(["--model-path", "m"]) is False
    assert "ParisKV not loaded" in capsys.readouterr().err


def test_the_engine_api_on_another_sglang_is_refused(sglang_0524):
    with pytest.raises(UnsupportedSGLangError, match="SGLang 0.5.24 is installed"):
        plugin.enable()


def test_register_on_another_sglang_adds_no_hooks(sglang_0524, monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    monkeypatch.delenv(plugin.ENV_CONFIG, raising=False)
    monkeypatch.setattr("sys.argv", ["sglang", "serve", "--model-path", "m"])
    registered = []
    monkeypatch.setattr(HookRegistry, "register", lambda *a, **k: registered.append(a))
    plugin.register()
    assert registered == []


@pytest.fixture(scope="module")
def server_args(tmp_path_factory):
    """A real ServerArgs for a tiny model on the CPU, as the installed SGLang builds it
    (resolved in the constructor up to 0.5.18; resolved explicitly from 0.5.19)."""
    from tests.tiny_models import save_tiny_model

    model = save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")
    with pytest.MonkeyPatch.context() as mp:  # plain SGLang: no ParisKV config around
        mp.delenv(plugin.ENV_CONFIG, raising=False)
        sa = ServerArgs(model_path=str(model), device="cpu", max_running_requests=40)
        if not sglang_compat.resolves_on_construction():
            sa.resolve_once()
    return sa


def test_decode_graph_batch_sizes_follow_sglangs_schedule(server_args):
    # SGLang's documented decode schedule: 1, 2, 4, 8, 12, then steps of 8, then max_bs
    assert sglang_compat.decode_graph_batch_sizes(server_args, 40) == [
        1,
        2,
        4,
        8,
        12,
        16,
        24,
        32,
        40,
    ]
    assert sglang_compat.decode_graph_batch_sizes(server_args, 10) == [1, 2, 4, 8, 10]


def test_resolved_values_are_read_where_the_installed_sglang_keeps_them(server_args):
    view = sglang_compat.resolved(server_args)
    assert sglang_compat.is_resolved(server_args)
    # no backend was given: SGLang chose one, and the view shows it in every release
    assert view.attention_backend == "torch_native"
    assert view.max_running_requests == 40
    if sglang_compat.resolves_on_construction():
        assert server_args.attention_backend == "torch_native"
    else:  # from 0.5.19 the field keeps the operator's input
        assert server_args.attention_backend is None


def _sglang_capture_sizes(server_args, pool_size: int) -> list[int]:
    """SGLang's decode graph runner's own choice of sizes (alignment 1: no DP attention),
    with what it reads from a running server stood in for: up to 0.5.18 the server
    arguments and parallel state, later the published runtime context (its graph config
    is the resolved one of ``server_args``)."""
    import types

    runner = pytest.importorskip("sglang.srt.model_executor.runner.base_cuda_graph_runner")
    ns = types.SimpleNamespace
    view = sglang_compat.resolved(server_args)
    published = ns(
        graph=ns(cuda_graph_config=view.cuda_graph_config, torch_compile_max_bs=0),
        overlap=ns(enable_two_batch_overlap=False),
    )
    stand_ins = {
        "get_cuda_graph_batch_size_alignment": lambda *a, **k: 1,
        # (server_args, n) up to 0.5.18, (n) from 0.5.19: n, at alignment 1
        "get_cuda_graph_max_batch_size": lambda *a: a[-1],
        "get_exec": lambda: published,
        "get_flags": lambda: ns(capture=ns(enable_torch_compile=False)),
        "DllmConfig": ns(from_server_args=lambda sa: None),
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, value in stand_ins.items():
            if hasattr(runner, name):
                mp.setattr(runner, name, value)
        mr = ns(server_args=server_args, req_to_token_pool=ns(size=pool_size))
        return runner.get_batch_sizes_to_capture(mr)[0]


@pytest.mark.parametrize("max_requests", [5, 20, 40, 41])
def test_captured_decode_batch_sizes_are_the_decode_runners(server_args, max_requests):
    """What the memory plan counts graphs for is what SGLang's decode runner captures."""
    got = sglang_compat.captured_decode_batch_sizes(server_args, max_requests)
    assert got == _sglang_capture_sizes(server_args, max_requests)


def test_no_decode_graphs_are_planned_when_they_are_disabled(tmp_path):
    from sglang_pariskv.pool_sizing import _graph_batch_sizes
    from tests.tiny_models import save_tiny_model

    model = save_tiny_model(tmp_path, "llama")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(plugin.ENV_CONFIG, raising=False)
        sa = ServerArgs(
            model_path=str(model), device="cpu", max_running_requests=40, disable_cuda_graph=True
        )
        if not sglang_compat.resolves_on_construction():
            sa.resolve_once()
    assert sglang_compat.captured_decode_batch_sizes(sa, 40) == []
    assert _graph_batch_sizes(sa, 40) == []
    assert _graph_batch_sizes(None, 3) == [1, 2, 3]
