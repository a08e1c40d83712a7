# Second call on a fresh GPU host (after `bash .device-bundle/p1/device_run.sh .device-bundle/p1`):
#   bash benchmarks/device/install.sh
# Installs SGLang's core group from the offline bundle into /tmp/site and this checkout
# (with its sglang.srt.plugins entry point, which SGLang needs to find the plugin) into
# /tmp/site2, then prints the entry point as a check.
set -e
REQUIRE=core STOP_AFTER_INSTALL=1 bash .device-bundle/p2/device_run.sh .device-bundle/p2 >/dev/null 2>&1
PYTHONPATH=/tmp/site pip install -q --no-build-isolation --no-deps --no-index --target /tmp/site2 . 2>&1 \
  | grep -v WARN || true
. benchmarks/device/env.sh
