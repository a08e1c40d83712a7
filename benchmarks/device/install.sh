# Second call on a fresh GPU host (after `bash .device-bundle/p1/device_run.sh .device-bundle/p1`):
#   bash benchmarks/device/install.sh [AOT_DIR]
# Installs SGLang's core group from the offline bundle into /tmp/site and this checkout
# (with its sglang.srt.plugins entry point, which SGLang needs to find the plugin) into
# /tmp/site2, then prints the entry point as a check. With AOT_DIR (parts saved by
# `flashinfer_aot.sh save`), restores FlashInfer's compiled modules into the installed
# package, which only the environment set here can import.
set -e
REQUIRE=core STOP_AFTER_INSTALL=1 bash .device-bundle/p2/device_run.sh .device-bundle/p2 >/dev/null 2>&1
PYTHONPATH=/tmp/site pip install -q --no-build-isolation --no-deps --no-index --target /tmp/site2 . 2>&1 \
  | grep -v WARN || true
. benchmarks/device/env.sh
if [ -n "${1:-}" ]; then
  bash benchmarks/device/flashinfer_aot.sh restore "$1"
fi
