"""patches/: the diff that builds ParisKV into SGLang still applies to the installed
SGLang's sources, and the patched tree imports, parses the ParisKV flags, resolves them
with SGLang's own pipeline and refuses what ParisKV cannot serve.

The patch targets one release (its file name says which); under another SGLang the tests
skip, naming both versions. The patched tree is a copy (hard links, with the patched
files copied) of the installed package, so the installed SGLang is never modified.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sglang_pariskv import sglang_compat

ROOT = Path(__file__).resolve().parents[1]
PATCHES = sorted((ROOT / "patches").glob("sglang-*-pariskv.patch"))


def _target(patch: Path) -> str:
    return re.fullmatch(r"sglang-(.+)-pariskv\.patch", patch.name).group(1)


def test_there_is_one_patch_and_it_targets_the_newest_supported_release():
    assert [_target(p) for p in PATCHES] == [sglang_compat.SUPPORTED_RANGE[1]]


@pytest.fixture(scope="module")
def patch() -> Path:
    (patch,) = PATCHES
    installed = sglang_compat.installed_version()
    if installed != _target(patch):
        pytest.skip(f"{patch.name} is for SGLang {_target(patch)}; SGLang {installed} is installed")
    return patch


def _touched(patch: Path) -> list[str]:
    return re.findall(r"^\+\+\+ b/(\S+)", patch.read_text(), re.M)


@pytest.fixture(scope="module")
def patched_tree(patch, tmp_path_factory) -> Path:
    """A copy of the installed ``sglang`` package with the patch applied."""
    import sglang

    installed = Path(sglang.__file__).parent
    root = tmp_path_factory.mktemp("patched")

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:  # another filesystem
            shutil.copy2(src, dst)

    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(installed, root / "sglang", copy_function=link, ignore=ignore)
    for rel in _touched(patch):
        path = root / rel
        if path.exists():  # unlink the hard link: the patch must not reach the install
            path.unlink()
            shutil.copy2(installed.parent / rel, path)
    check = subprocess.run(
        ["git", "apply", "--check", str(patch)], cwd=root, capture_output=True, text=True
    )
    assert check.returncode == 0, f"{patch.name} no longer applies:\n{check.stderr}"
    subprocess.run(["git", "apply", str(patch)], cwd=root, check=True)
    return root


def test_the_patch_applies_without_touching_the_installed_sglang(patch, patched_tree):
    import sglang

    installed = Path(sglang.__file__).parent.parent
    for rel in _touched(patch):
        new, old = patched_tree / rel, installed / rel
        if old.exists():  # a file the patch changes: a separate copy, changed there only
            assert not new.samefile(old) and new.read_text() != old.read_text()
            assert "enable_pariskv" not in old.read_text()


PATCHED_SCRIPT = r"""
import argparse, importlib, sys
import tests.conftest  # the sgl_kernel stand-in on a machine without a GPU
import sglang
assert sglang.__file__.startswith(sys.argv[1]), sglang.__file__
for name in ("arg_groups.pariskv_hook", "layers.attention.attention_registry",
             "mem_cache.kv_cache_configurator", "model_executor.pool_configurator", "models.utils"):
    importlib.import_module(f"sglang.srt.{name}")
from sglang.srt.arg_groups.overrides import resolved_view
from sglang.srt.plugins.hook_registry import HookRegistry
from sglang.srt.server_args import ServerArgs
from sglang_pariskv import plugin, sglang_compat
from sglang_pariskv.config import ParisKVConfigError

parser = argparse.ArgumentParser()
ServerArgs.add_cli_args(parser)

def resolve(*flags):
    args = parser.parse_args(["--model-path", sys.argv[2], "--device", "cpu", *flags])
    sa = ServerArgs.from_cli_args(args)
    sa.resolve_once()
    return sa

sa = resolve()
assert "sglang_pariskv.native" not in sys.modules  # without the flag, nothing is imported
assert resolved_view(sa).attention_backend == "torch_native"
sa = resolve("--enable-pariskv", "--pariskv-topk", "512")
from sglang_pariskv.native import config_of
view = resolved_view(sa)
print("backend", view.attention_backend, "slots", view.max_running_requests,
      "topk", config_of(sa).topk)
try:
    resolve("--enable-pariskv", "--page-size", "16")
except ParisKVConfigError as e:
    print("refused", e)
try:
    resolve("--enable-pariskv", "--pariskv-topk", "0")
except ParisKVConfigError as e:
    print("refused", e)
try:  # a host pool larger than any host: refused at resolution, before any model work
    resolve("--enable-pariskv", "--pariskv-offload", "host", "--pariskv-host-pool-gb", "1000000")
except ParisKVConfigError as e:
    print("refused", e)
sa = resolve("--enable-pariskv", "--pariskv-candidate-ratio", "0.3", "--pariskv-dense-layers", "0")
cfg = config_of(sa)
print("candidate ratio", cfg.candidate_ratio, "dense layers", cfg.dense_layers)

# Every flag the plugin adds is a field of the patched ServerArgs.
from sglang_pariskv.server_flags import add_cli_args
mine = argparse.ArgumentParser()
add_cli_args(mine)
ours = {o for a in mine._actions for o in a.option_strings if "pariskv" in o}
print("flags missing", sorted(ours - set(parser._option_string_actions)))

# The decode graph runner asks the backend for its graph variants: ParisKV's two graphs.
import types
from sglang.srt.layers.attention.graph_variants import backend_graph_variants
from sglang.srt.model_executor.runner_utils.capture_mode import _set_capture_attention_variant
from sglang_pariskv.attention.backend import ParisKVAttnBackend
from sglang_pariskv.attention.step_graphs import StepGraphs
import torch
def step_graph(seq):
    return "sparse" if int(seq.max()) > 100 else "dense"
fake = types.SimpleNamespace(graphs=StepGraphs(), step_graph=step_graph)
fake.decode_graph_variants = lambda: ParisKVAttnBackend.decode_graph_variants(fake)
variants = backend_graph_variants(fake)
batch = lambda *lens: types.SimpleNamespace(seq_lens_cpu=torch.tensor(lens), batch_size=len(lens))
picks = variants.select(batch(5, 500)), variants.select(batch(5, 50))
print("variants", variants.capture_labels, *picks)
_set_capture_attention_variant("dense")
print("capturing", fake.graphs.capture_step, fake.graphs.captured)
_set_capture_attention_variant(None)
print("backend_graph_variants of another backend", backend_graph_variants(object()))

assert sglang_compat.native_pariskv()
plugin.register()
print("plugin hooks", sum(len(v) for v in HookRegistry._hooks.values()))
"""


def test_the_patched_sglang_serves_the_flags_natively(patched_tree, tmp_path):
    from tests.child_python import run_script
    from tests.tiny_models import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny", "llama")
    lines = run_script(PATCHED_SCRIPT, str(patched_tree), str(model), path=(patched_tree,))
    assert "backend flashinfer slots 256 topk 512" in lines
    refused = [line for line in lines if line.startswith("refused")]
    assert len(refused) == 3
    assert "--page-size 16" in refused[0] and "--page-size 1" in refused[0]
    assert "topk=0" in refused[1]
    assert "--pariskv-host-pool-gb asks for 1000000.0 GiB" in refused[2]
    assert "candidate ratio 0.3 dense layers (0,)" in lines
    assert "flags missing []" in lines
    assert "variants ('sparse', 'dense') sparse dense" in lines
    assert "capturing dense True" in lines
    assert "backend_graph_variants of another backend None" in lines
    assert lines[-1] == "plugin hooks 0"  # the plugin adds nothing to a patched SGLang


def test_the_patched_decode_graph_runner_asks_the_backend_for_its_graphs(patched_tree):
    runner = patched_tree / "sglang/srt/model_executor/runner/decode_cuda_graph_runner.py"
    assert "or backend_graph_variants(self.attn_backend)" in runner.read_text()
