"""Flags and startup validation, through SGLang's real parser and plugin hooks."""

import argparse
import json
from importlib.metadata import entry_points

import pytest
from sglang.srt.plugins.hook_registry import HookRegistry
from sglang.srt.server_args import ServerArgs

from sglang_pariskv import plugin, sglang_compat
from sglang_pariskv.config import DEFAULT_HOT_CACHE_LINES, ParisKVConfig
from sglang_pariskv.server_flags import ParisKVConfigError, config_from_args
from sglang_pariskv.startup_checks import check_model, check_server_args


@pytest.fixture(scope="module")
def parser():
    import os

    os.environ.pop(plugin.ENV_CONFIG, None)
    plugin.register()
    HookRegistry.apply_hooks()
    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    return p


def parse(parser, *flags):
    return parser.parse_args(["--model-path", "m", *flags])


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("pariskv") == "sglang_pariskv.plugin:register"


def test_without_the_flag_nothing_is_enabled(parser):
    args = parse(parser)
    assert args.enable_pariskv is False and config_from_args(args) is None
    sentinel = object()
    assert plugin._around_from_cli_args(lambda cls, a: sentinel, ServerArgs, args) is sentinel


def test_a_launch_without_the_flag_drops_an_inherited_config(parser, monkeypatch, caplog):
    """A config left in the environment (``enable()`` in a parent, an exported variable)
    must not switch ParisKV on in the schedulers of a launch that did not ask for it."""
    monkeypatch.setenv(plugin.ENV_CONFIG, json.dumps(ParisKVConfig().to_dict()))
    seen = []
    plugin._around_from_cli_args(lambda cls, a: seen.append(plugin.config_from_env()), ServerArgs,
                                 parse(parser))  # fmt: skip
    assert seen == [None] and plugin.ENV_CONFIG in caplog.text


def test_disable_undoes_enable_for_later_engines(monkeypatch):
    monkeypatch.delenv(plugin.ENV_CONFIG, raising=False)
    monkeypatch.setattr(plugin, "install_serving_hooks", lambda cfg: None)
    plugin.enable(ParisKVConfig(topk=256))
    assert plugin.config_from_env().topk == 256
    plugin.disable()
    assert plugin.config_from_env() is None


def test_flags_build_the_config(parser, tmp_path):
    args = parse(
        parser,
        "--enable-pariskv",
        "--pariskv-topk",
        "512",
        "--pariskv-sink",
        "16",
        "--pariskv-candidate-ratio",
        "0.3",
        "--pariskv-min-sparse-tokens",
        "49152",
    )
    cfg = config_from_args(args)
    assert cfg == ParisKVConfig(topk=512, sink=16, candidate_ratio=0.3, min_sparse_tokens=49152)
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"topk": 100, "local": 32, "dense_threshold": 4096}))
    args = parse(parser, "--enable-pariskv", "--pariskv-config", str(f), "--pariskv-topk", "64")
    cfg = config_from_args(args)
    assert (cfg.topk, cfg.local, cfg.dense_threshold) == (64, 32, 4096)  # flag overrides file


def test_config_file_defaults_follow_the_flags(parser, tmp_path):
    """A file that leaves the offload-dependent fields unset gets the defaults of the
    offload the flags choose, not the GPU pool's (resolved before the merge)."""
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"topk": 1024}))
    flags = ["--pariskv-offload", "host", "--pariskv-host-pool-gb", "60"]
    cfg = config_from_args(parse(parser, "--enable-pariskv", "--pariskv-config", str(f), *flags))
    assert cfg == ParisKVConfig(topk=1024, offload="host", host_pool_gb=60.0)
    assert (cfg.min_sparse_tokens, cfg.hot_cache_lines) == (0, DEFAULT_HOT_CACHE_LINES)
    f.write_text(json.dumps({"offload": "host", "host_pool_gb": 8, "hot_cache_lines": 64}))
    cfg = config_from_args(parse(parser, "--enable-pariskv", "--pariskv-config", str(f)))
    assert (cfg.offloaded, cfg.hot_cache_lines, cfg.min_sparse_tokens) == (True, 64, 0)


def test_config_file_errors_name_the_file(parser, tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"topk": 0}))
    with pytest.raises(ParisKVConfigError, match=f"topk=0.*--pariskv-config {f}"):
        config_from_args(parse(parser, "--enable-pariskv", "--pariskv-config", str(f)))
    f.write_text(json.dumps({"top_k": 8}))
    with pytest.raises(ParisKVConfigError, match=r"config file .*unknown key\(s\) \['top_k'\]"):
        config_from_args(parse(parser, "--enable-pariskv", "--pariskv-config", str(f)))


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--pariskv-topk", "5"], ["--pariskv-topk", "without --enable-pariskv"]),
        (["--enable-pariskv", "--pariskv-topk", "0"], ["topk=0", "--pariskv-topk"]),
        (
            ["--enable-pariskv", "--pariskv-candidate-ratio", "lots"],
            ["--pariskv-candidate-ratio", "'lots'", "auto"],
        ),
        (["--enable-pariskv", "--pariskv-candidate-ratio", "2"], ["candidate_ratio=2.0", "(0, 1]"]),
        (["--enable-pariskv", "--pariskv-config", "/no/such.json"], ["does not exist"]),
        (
            ["--enable-pariskv", "--pariskv-offload", "host"],
            ["--pariskv-offload host", "--pariskv-host-pool-gb G"],
        ),
        (
            ["--enable-pariskv", "--pariskv-host-pool-gb", "8"],
            ["--pariskv-host-pool-gb 8", "without --pariskv-offload host"],
        ),
        (
            ["--enable-pariskv", "--pariskv-offload", "host", "--pariskv-host-pool-gb", "-1"],
            ["host_pool_gb=-1.0", "--pariskv-host-pool-gb"],
        ),
        (
            ["--enable-pariskv", "--pariskv-hot-cache-lines", "-4"],
            ["hot_cache_lines=-4", "--pariskv-hot-cache-lines"],
        ),
        (["--pariskv-offload", "host"], ["--pariskv-offload", "without --enable-pariskv"]),
        (["--pariskv-stats-dir", "/tmp/x"], ["--pariskv-stats-dir", "without --enable-pariskv"]),
        (
            ["--enable-pariskv", "--pariskv-hot-cache-lines", "4096"],
            ["--pariskv-hot-cache-lines 4096", "host offload only"],
        ),
    ],
)
def test_bad_flags_fail_early_naming_the_flag(parser, flags, words):
    with pytest.raises(ParisKVConfigError) as e:
        config_from_args(parse(parser, *flags))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--attention-backend", "triton"], ["--attention-backend triton", "flashinfer"]),
        (["--speculative-algorithm", "EAGLE"], ["--speculative-algorithm"]),
        (["--enable-hierarchical-cache"], ["--enable-hierarchical-cache"]),
        (["--page-size", "16"], ["--page-size 16", "--page-size 1"]),
        (["--kv-cache-dtype", "fp8_e4m3"], ["--kv-cache-dtype fp8_e4m3"]),
        (["--enable-dp-attention"], ["--enable-dp-attention"]),
        (["--enable-pdmux"], ["--enable-pdmux", "decode state"]),
        (["--enable-two-batch-overlap"], ["--enable-two-batch-overlap"]),
        (["--enable-torch-compile"], ["--enable-torch-compile", "CUDA graphs stay on"]),
        (["--disaggregation-mode", "decode"], ["--disaggregation-mode decode", "codes"]),
        (["--enable-lora"], ["--enable-lora", "without --enable-pariskv"]),
        (["--enable-deterministic-inference"], ["--enable-deterministic-inference", "ties"]),
        (["--enable-mixed-chunk"], ["--enable-mixed-chunk", "densely"]),
    ],
)
def test_unsupported_combinations_are_refused(parser, flags, words, capsys):
    """The launcher stops with argparse's exit code and one error line, no traceback."""
    args = parse(parser, "--enable-pariskv", *flags)
    with pytest.raises(SystemExit) as e:
        plugin._around_from_cli_args(resolve, ServerArgs, args)
    assert e.value.code == 2 and e.value.__cause__ is None
    err = capsys.readouterr().err
    assert err.startswith("error: --enable-pariskv cannot be served")
    for w in words:
        assert w in err


@pytest.mark.parametrize(
    "flags",
    [
        ["--cuda-graph-backend-prefill", "full"],
        ["--cuda-graph-config", '{"prefill": {"backend": "full"}}'],
    ],
)
def test_whole_forward_prefill_graphs_are_refused(parser, flags, capsys):
    """A full prefill graph would capture ParisKV's extend, which is only run eagerly; the
    other prefill graph backends keep attention (and the code writes) eager."""
    if not any(a.option_strings == [flags[0]] for a in parser._actions):
        pytest.skip(f"this SGLang has no {flags[0]}")
    with pytest.raises(SystemExit):
        plugin._around_from_cli_args(resolve, ServerArgs, parse(parser, "--enable-pariskv", *flags))
    assert "--cuda-graph-backend-prefill full" in capsys.readouterr().err
    if flags[0] == "--cuda-graph-backend-prefill":
        args = parse(parser, "--enable-pariskv", flags[0], "breakable")
        assert plugin._around_from_cli_args(resolve, ServerArgs, args) is not None


@pytest.mark.parametrize(
    "env, flags, words",
    [
        ({"SGLANG_ENABLE_POST_CAPTURE_KV_SIZING": "1"}, [], ["POST_CAPTURE", "unset it"]),
        (
            {"SGLANG_USE_HND_KVCACHE": "true"},
            ["--pariskv-offload", "host", "--pariskv-host-pool-gb", "1"],
            ["SGLANG_USE_HND_KVCACHE", "NHD"],
        ),
    ],
)
def test_unsupported_environment_switches_are_refused_at_launch(
    parser, monkeypatch, capsys, env, flags, words
):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("sglang_pariskv.offload.host_pool.check_host_memory", lambda *a, **k: None)
    with pytest.raises(SystemExit):
        plugin._around_from_cli_args(resolve, ServerArgs, parse(parser, "--enable-pariskv", *flags))
    err = capsys.readouterr().err
    assert err.startswith("error: --enable-pariskv cannot be served with this environment")
    assert all(w in err for w in words)
    monkeypatch.setenv(next(iter(env)), "0")  # switched off: the same launch goes through
    assert plugin._around_from_cli_args(
        resolve, ServerArgs, parse(parser, "--enable-pariskv", *flags)
    )


def test_a_bad_flag_value_is_one_error_line(parser, capsys):
    args = parse(parser, "--enable-pariskv", "--pariskv-topk", "0")
    with pytest.raises(SystemExit):
        plugin._around_from_cli_args(resolve, ServerArgs, args)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--pariskv-topk" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "flags, lines",
    [
        (["--pariskv-offload", "host", "--pariskv-host-pool-gb", "8"], DEFAULT_HOT_CACHE_LINES),
        (
            [
                "--pariskv-offload",
                "host",
                "--pariskv-host-pool-gb",
                "8",
                "--pariskv-hot-cache-lines",
                "0",
            ],
            0,
        ),  # fmt: skip
        ([], 0),
    ],
)
def test_the_hot_cache_is_on_by_default_with_host_offload_only(parser, flags, lines):
    cfg = config_from_args(parse(parser, "--enable-pariskv", *flags))
    assert cfg.hot_cache_lines == lines
    assert ParisKVConfig.from_dict(cfg.to_dict()) == cfg


def test_a_hot_cache_without_offload_is_refused(parser):
    args = parse(parser, "--enable-pariskv", "--pariskv-hot-cache-lines", "4096")
    with pytest.raises(ParisKVConfigError, match="--pariskv-offload host"):
        config_from_args(args)


def test_offload_flags_build_the_config_and_check_host_memory(parser, monkeypatch):
    args = parse(
        parser, "--enable-pariskv", "--pariskv-offload", "host", "--pariskv-host-pool-gb",
        "48", "--pariskv-hot-cache-lines", "4096", "--pariskv-stats-dir", "/tmp/counters",
    )  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.offloaded and cfg.host_pool_gb == 48.0 and cfg.hot_cache_lines == 4096
    assert cfg.stats_dir == "/tmp/counters"
    assert ParisKVConfig.from_dict(cfg.to_dict()) == cfg  # travels to the scheduler intact
    asked = []

    def fake_check(nbytes, ranks=1):
        asked.append((nbytes, ranks))
        raise ParisKVConfigError("short")

    monkeypatch.setattr("sglang_pariskv.offload.host_pool.check_host_memory", fake_check)
    args.tp_size = 2  # each TP rank pins its own pool
    with pytest.raises(SystemExit):
        plugin._around_from_cli_args(resolve, ServerArgs, args)
    assert asked == [(2 * 48 * 2**30, 2)]
    args.dp_size = 3  # ... in each of the data-parallel replicas
    with pytest.raises(SystemExit):
        plugin._around_from_cli_args(resolve, ServerArgs, args)
    assert asked[-1] == (6 * 48 * 2**30, 6)


def test_enabling_picks_flashinfer_and_exports_the_config(parser, monkeypatch):
    monkeypatch.delenv(plugin.ENV_CONFIG, raising=False)
    args = parse(parser, "--enable-pariskv", "--pariskv-topk", "256")
    out = plugin._around_from_cli_args(resolve, ServerArgs, args)
    assert out.attention_backend == "flashinfer"
    assert plugin.config_from_env().topk == 256
    check_server_args(out)  # the resolved args pass


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"use_mla": True}, ["MLA"]),
        ({"sliding_window": True}, ["sliding-window"]),
        ({"v_head_dim": 64}, ["v_head_dim 64"]),
        ({"num_q_heads": 12, "num_kv_heads": 8}, ["12 query heads for 8 KV heads", "--tp-size"]),
    ]
    + [
        ({"head_dim": d, "v_head_dim": d}, [f"head_dim {d}", "64 or 128"])
        for d in (32, 80, 96, 256)
    ],
)
def test_unsupported_models_are_refused(kwargs, words):
    base = dict(
        use_mla=False, head_dim=128, v_head_dim=128, sliding_window=False, model_name="m",
        num_q_heads=32, num_kv_heads=8,
    )  # fmt: skip
    base.update(kwargs)
    with pytest.raises(ParisKVConfigError) as e:
        check_model(**base)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 7, 8])
def test_every_head_dim_and_gqa_group_is_served_or_refused_at_startup(head_dim, group):
    """The startup check accepts exactly the shapes the kernels are built and tested for:
    head_dim 64 and 128 with any GQA group (tests/test_kernels_workspace.py runs those on
    the GPU against the codec); every other head_dim is refused naming it, and one that is
    not a power of two is refused by the kernels' own guard too."""
    from sglang_pariskv.kernels.workspace import DecodeWorkspace
    from sglang_pariskv.support import SERVING_HEAD_DIMS

    kw = dict(use_mla=False, head_dim=head_dim, v_head_dim=head_dim, sliding_window=False,
              model_name="m", num_q_heads=2 * group, num_kv_heads=2)  # fmt: skip
    if head_dim in SERVING_HEAD_DIMS:
        check_model(**kw)
        return
    with pytest.raises(ParisKVConfigError, match=f"head_dim {head_dim}"):
        check_model(**kw)
    if head_dim & (head_dim - 1) == 0:
        return  # the Triton kernels take it (CPU tests use small powers of two)
    with pytest.raises(ParisKVConfigError, match=f"head_dim {head_dim}"):
        DecodeWorkspace(ParisKVConfig(), 2 * group, 2, head_dim, max_batch=1, max_context=64,
                        device="cpu")  # fmt: skip


def test_gpus_older_than_ampere_are_refused():
    from sglang_pariskv.support import check_compute_capability

    check_compute_capability((8, 0))
    check_compute_capability((9, 0))
    with pytest.raises(ParisKVConfigError, match="compute capability 7.5"):
        check_compute_capability((7, 5), "Tesla T4")


def test_enabling_bounds_request_slots_unless_the_user_chose(parser, monkeypatch):
    monkeypatch.delenv(plugin.ENV_CONFIG, raising=False)
    args = parse(parser, "--enable-pariskv")
    out = plugin._around_from_cli_args(resolve, ServerArgs, args)
    assert out.max_running_requests == plugin.DEFAULT_MAX_RUNNING_REQUESTS
    args = parse(parser, "--enable-pariskv", "--max-running-requests", "1000")
    out = plugin._around_from_cli_args(resolve, ServerArgs, args)
    assert out.max_running_requests == 1000
    args = parse(parser)  # without ParisKV, SGLang's own default stays
    assert plugin._around_from_cli_args(resolve, ServerArgs, args).max_running_requests is None


def resolve(cls, args):
    """``ServerArgs.from_cli_args`` as the installed SGLang runs it, without an accelerator.

    Up to SGLang 0.5.18 construction resolves the arguments (which needs an accelerator),
    so a stand-in builds a real ServerArgs holding the parsed values, read-only as SGLang
    leaves it after resolution: a hook that writes to it fails here as it does on a GPU.
    From 0.5.19 construction only records the input: the real method runs."""
    if not sglang_compat.resolves_on_construction():
        return cls.from_cli_args(args)
    sa = object.__new__(cls)
    for k, v in vars(args).items():
        object.__setattr__(sa, k, v)
    object.__setattr__(sa, "_declarations_materialized", True)
    return sa


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def engine_server_args(model_dir, **fields):
    """ServerArgs as the Engine API builds them, resolved by SGLang itself on the CPU
    (in the constructor up to 0.5.18, in ``resolve_once`` from 0.5.19), with the plugin's
    hooks applied (the ``parser`` fixture registers them)."""
    sa = ServerArgs(model_path=str(model_dir), device="cpu", **fields)
    if not sglang_compat.resolves_on_construction():
        sa.resolve_once()
    return sa


@pytest.fixture
def pariskv_on(monkeypatch):
    """ParisKV enabled as the Engine API enables it (no command line was parsed)."""
    monkeypatch.setenv(plugin.ENV_CONFIG, json.dumps(ParisKVConfig().to_dict()))
    monkeypatch.setattr(plugin, "_launched_from_cli", False)


def test_the_resolution_hook_wraps_the_method_that_resolves(parser):
    target = sglang_compat.resolution_target()
    name = "__post_init__" if sglang_compat.resolves_on_construction() else "resolve_once"
    assert target == f"sglang.srt.server_args.ServerArgs.{name}"
    assert target in HookRegistry._patched  # SGLang's registry applied it


@pytest.mark.parametrize("given, expected", [(None, 256), (1000, 1000)])
def test_engine_api_caps_slots_before_sglang_resolves(
    parser, tiny_model, pariskv_on, given, expected
):
    sa = engine_server_args(tiny_model, attention_backend="flashinfer", max_running_requests=given)
    assert sa.max_running_requests == expected
    assert sglang_compat.resolved(sa).max_running_requests == expected
    with pytest.raises(AttributeError, match="read-only"):
        sa.max_running_requests = 7  # real ServerArgs guard: the cap had to come first


def test_engine_api_checks_the_backend_sglang_resolved(parser, tiny_model, pariskv_on):
    """Without ``attention_backend`` SGLang picks one during resolution (torch_native on
    this CPU); from 0.5.19 the record's own field still reads None, so only the resolved
    value shows that ParisKV would not be served."""
    with pytest.raises(ParisKVConfigError, match="--attention-backend torch_native"):
        engine_server_args(tiny_model)


def test_a_launch_refused_at_resolution_ends_with_one_line(
    parser, tiny_model, pariskv_on, monkeypatch, capsys
):
    monkeypatch.setattr(plugin, "_launched_from_cli", True)
    with pytest.raises(SystemExit) as e:
        engine_server_args(tiny_model)
    assert e.value.code == 2 and e.value.__cause__ is None
    err = capsys.readouterr().err
    assert err.startswith("error: --enable-pariskv cannot be served") and err.count("\n") == 1


def test_engine_api_checks_every_ranks_host_pool_together(parser, tiny_model, monkeypatch):
    """Engine API with host offload: the ranks' pools are checked together at resolution,
    before any rank starts (each rank alone would see the memory the others take)."""
    cfg = ParisKVConfig(offload="host", host_pool_gb=10.0)
    monkeypatch.setenv(plugin.ENV_CONFIG, json.dumps(cfg.to_dict()))
    monkeypatch.setattr(plugin, "_launched_from_cli", False)
    asked = []

    def fake_check(nbytes, ranks=1):
        asked.append((nbytes, ranks))
        raise ParisKVConfigError("--pariskv-host-pool-gb asks for too much")

    monkeypatch.setattr("sglang_pariskv.offload.host_pool.check_host_memory", fake_check)
    with pytest.raises(ParisKVConfigError, match="--pariskv-host-pool-gb"):
        engine_server_args(tiny_model, attention_backend="flashinfer", tp_size=2)
    assert asked == [(2 * 10 * 2**30, 2)]


def test_without_pariskv_resolution_is_untouched(parser, tiny_model, monkeypatch):
    monkeypatch.delenv(plugin.ENV_CONFIG, raising=False)
    sa = engine_server_args(tiny_model, attention_backend="triton")
    assert sa.max_running_requests is None
    assert sglang_compat.resolved(sa).attention_backend == "triton"


HELP_SCRIPT = r"""
import contextlib, io, runpy, sys
import tests.conftest  # the sgl_kernel stand-in on a machine without a GPU
from sglang.cli.main import main

def help_text(argv, run):
    sys.argv, out = argv, io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        run()
    return out.getvalue()

serve = help_text(["sglang", "serve", "--help"], main)
launch = help_text(["launch_server", "--help"],
                   lambda: runpy.run_module("sglang.launch_server", run_name="__main__"))
print("serve", "--enable-pariskv" in serve, "--model-path" in serve)
print("launch_server", "--enable-pariskv" in launch, "--pariskv-topk" in launch)
"""


def test_which_help_lists_the_flags():
    """As the README says, for every supported SGLang: ``sglang serve --help`` prints
    SGLang's help before it loads plugins, so the ParisKV flags are missing there;
    ``python -m sglang.launch_server --help`` loads them first and lists them."""
    from tests.child_python import run_script

    lines = run_script(HELP_SCRIPT)
    assert lines[-2:] == ["serve False True", "launch_server True True"]


def test_dense_layers_outside_a_local_model_are_refused_at_launch(parser, tiny_model, capsys):
    """Before any weights load: the launcher reads the model folder's config.json."""
    from sglang_pariskv.startup_checks import check_dense_layers_fit

    layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    args = parser.parse_args(
        ["--model-path", str(tiny_model), "--enable-pariskv", "--pariskv-dense-layers", str(layers)]
    )
    with pytest.raises(SystemExit):
        plugin._around_from_cli_args(lambda cls, a: pytest.fail("launched"), ServerArgs, args)
    err = capsys.readouterr().err
    assert "--pariskv-dense-layers" in err and str(layers) in err
    check_dense_layers_fit(ParisKVConfig(dense_layers=(0, layers - 1)), str(tiny_model))
    check_dense_layers_fit(ParisKVConfig(dense_layers=(99,)), "org/hub-name")  # left to SGLang


def test_engine_api_refuses_dense_layers_outside_the_model(parser, tiny_model, monkeypatch):
    layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    cfg = ParisKVConfig(dense_layers=(0, layers))
    monkeypatch.setenv(plugin.ENV_CONFIG, json.dumps(cfg.to_dict()))
    monkeypatch.setattr(plugin, "_launched_from_cli", False)
    with pytest.raises(ParisKVConfigError, match=f"--pariskv-dense-layers.*\\[{layers}\\]"):
        engine_server_args(tiny_model, attention_backend="flashinfer")
