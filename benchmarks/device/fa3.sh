#!/usr/bin/env bash
# SGLang's FA3 attention backend on the offline GPU host (dense `--dense-backend fa3`).
#
# The offline bundle trims sglang-kernel's FA3 library (sgl_kernel/flash_ops.abi3.so,
# about 1.1 GB) to fit its transfers, so `--attention-backend fa3` fails there with "Can not
# import FA3 in sgl_kernel". This carries that library alone, xz-compressed (about 133 MB),
# in parts of at most 55 MB (each device call carries 64 MiB):
#
#   bash benchmarks/device/fa3.sh split [WHEEL]   # here: .device-bundle/fa3/pNN/part
#   bash benchmarks/device/fa3.sh stage .device-bundle/fa3/pNN   # device, one call per
#                                                 # part (three), carrying that folder
#   bash benchmarks/device/fa3.sh install         # device, after every part: puts the
#                                                 # library into the bundle's /tmp/site
#
# `stage PART [STAGING]` and `install [STAGING [SITE]]` collect the parts in STAGING
# (default /tmp/fa3) and install into SITE (default /tmp/site, where the bundle installs).
#
# WHEEL defaults to the untrimmed wheel the bundle builder cached, else pip downloads it
# (the version the bundle installs); `split` takes a few minutes (xz -9e). Make the calls
# back to back (the host is given back 30 s after a call); `install` checks the joined
# library's checksum before it replaces the trimmed one.
set -euo pipefail
VERSION=0.4.5
NAME="sglang_kernel-$VERSION-cp310-abi3-manylinux2014_x86_64.whl"
case "${1:-}" in
split)
    wheel=${2:-$HOME/.cache/device-bundle/wheels/$NAME}
    tmp=$(mktemp -d)
    if [ ! -f "$wheel" ]; then
        pip download -q --no-deps -d "$tmp" "sglang-kernel==$VERSION"
        wheel=$tmp/$NAME
    fi
    python3 -m zipfile -e "$wheel" "$tmp/x" > /dev/null
    lib=$tmp/x/sgl_kernel/flash_ops.abi3.so
    rm -rf .device-bundle/fa3 && mkdir -p .device-bundle/fa3
    xz -T0 -9e -c "$lib" | split -b 55M -d -a 2 - .device-bundle/fa3/part
    for p in .device-bundle/fa3/part*; do
        n=${p##*part}
        mkdir -p ".device-bundle/fa3/p$n" && mv "$p" ".device-bundle/fa3/p$n/part"
    done
    sha256sum "$lib" | cut -d' ' -f1 > .device-bundle/fa3/p00/sha256
    rm -rf "$tmp"
    ls .device-bundle/fa3
    ;;
stage)
    n=${2##*/p}
    staging=${3:-/tmp/fa3}
    mkdir -p "$staging"
    cp "$2/part" "$staging/part$n"
    if [ -f "$2/sha256" ]; then cp "$2/sha256" "$staging/sha256"; fi
    ls "$staging"
    ;;
install)
    staging=${2:-/tmp/fa3}
    site=${3:-/tmp/site}
    lib=$staging/flash_ops.abi3.so
    cat "$staging"/part* | python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), open(sys.argv[1], 'wb'), 1 << 24)" "$lib"
    echo "$(cat "$staging/sha256")  $lib" | sha256sum -c --quiet
    mv "$lib" "$site/sgl_kernel/flash_ops.abi3.so"
    PYTHONPATH=$site python3 -c "import sgl_kernel.flash_attn; print('FA3 importable')"
    ;;
*)
    echo "usage: $0 split [WHEEL] | stage PART [STAGING] | install [STAGING [SITE]]" >&2
    exit 2
    ;;
esac
