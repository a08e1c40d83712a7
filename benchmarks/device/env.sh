# Source on the GPU host after the offline SGLang bundle is installed (../shared/device):
#   . benchmarks/device/env.sh
# Puts the bundle's site-packages and this checkout (installed with its entry point into
# /tmp/site2) on the path, and assembles the SmolLM2 GGUF if its two carried halves exist.
export PYTHONPATH=$PWD:/tmp/site:/tmp/site2 HF_HUB_OFFLINE=1 CUDA_HOME=/usr/local/cuda \
  SGLANG_PARISKV_CACHE=/tmp/pkv PYTHONUNBUFFERED=1
if [ -f /tmp/gguf.part00 ] && [ -f /tmp/gguf.part01 ] && [ ! -f /tmp/smol.gguf ]; then
  cat /tmp/gguf.part00 /tmp/gguf.part01 > /tmp/smol.gguf
fi
[ -f /tmp/smol.gguf ] && export SGLANG_PARISKV_SMOLLM2_GGUF=/tmp/smol.gguf
python3 -c "from importlib.metadata import entry_points as e; \
print('pariskv entry point:', [x.value for x in e(group='sglang.srt.plugins')])"
