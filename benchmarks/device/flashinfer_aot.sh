#!/usr/bin/env bash
# FlashInfer's JIT-compiled kernels, carried from one fresh GPU host to the next.
#
#   bash benchmarks/device/flashinfer_aot.sh save DIR      # on the host, after a server ran
#   bash benchmarks/device/flashinfer_aot.sh restore DIR   # on a fresh host, after install.sh
#
# The first SGLang start on a fresh host compiles FlashInfer's attention and sampling
# modules for minutes. FlashInfer loads a module without building it when
# <flashinfer package>/data/aot/<module>/<module>.so exists (its ahead-of-time directory),
# so the libraries one host compiled serve the next host of the same GPU architecture and
# FlashInfer version. Carrying the whole JIT cache does not help: ninja rebuilds every
# object whose headers the fresh install made newer.
#
# `save` packs every compiled module library under ~/.cache/flashinfer (xz) into parts of
# at most 15 MiB named flashinfer_aot.<version>.<arch>.tar.xz.NN in DIR (a call brings
# back at most 8 files of 16 MiB). `restore` unpacks the parts found in DIR into the
# installed package's ahead-of-time directory; a module missing there is still compiled.
set -euo pipefail
CACHE=${FLASHINFER_WORKSPACE_BASE:-$HOME}/.cache/flashinfer

case "${1:-}" in
save)
    dir=$2
    mkdir -p "$dir"
    # <cache>/<version>/<arch>/cached_ops/<module>/<module>.so
    mapfile -t libs < <(cd "$CACHE" && find . -path '*/cached_ops/*/*.so' | sort)
    if [ ${#libs[@]} -eq 0 ]; then
        echo "no compiled FlashInfer module under $CACHE" >&2
        exit 1
    fi
    first=${libs[0]#./}
    tag=$(echo "$first" | cut -d/ -f1).$(echo "$first" | cut -d/ -f2)
    # one archive of <module>/<module>.so entries
    (cd "$CACHE/$(dirname "$(dirname "$first")")" && XZ_OPT=-T0 tar -cJf - \
        $(for l in "${libs[@]}"; do echo "${l#./*/*/*/}"; done)) \
        | split -b 15M -d - "$dir/flashinfer_aot.$tag.tar.xz."
    echo "saved ${#libs[@]} modules ($tag):"
    ls -l "$dir"/flashinfer_aot."$tag".tar.xz.*
    ;;
restore)
    dir=$2
    parts=("$dir"/flashinfer_aot.*.tar.xz.*)
    [ -e "${parts[0]}" ] || { echo "no flashinfer_aot parts in $dir" >&2; exit 1; }
    pkg=$(python3 -c "import importlib.util as u; s = u.find_spec('flashinfer'); print(s.submodule_search_locations[0] if s else '')")
    if [ -z "$pkg" ]; then
        echo "FlashInfer is not importable here: run this after '. benchmarks/device/env.sh'" \
            "(or pass DIR to benchmarks/device/install.sh)" >&2
        exit 1
    fi
    version=$(python3 -c "from importlib.metadata import version; print(version('flashinfer-python'))")
    tag=$(basename "${parts[0]}" | sed 's/^flashinfer_aot\.\(.*\)\.tar\.xz\.[0-9]*$/\1/')
    arch=$(python3 -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
    case "$tag" in
    "$version.$arch"*) ;;
    *)
        echo "parts are for FlashInfer/arch $tag, this host has $version/$arch: not restored" >&2
        exit 1
        ;;
    esac
    mkdir -p "$pkg/data/aot"
    cat "${parts[@]}" | tar -xJf - -C "$pkg/data/aot"
    echo "restored $(find "$pkg/data/aot" -name '*.so' | wc -l) FlashInfer modules into $pkg/data/aot"
    ;;
*)
    echo "usage: $0 save DIR | restore DIR" >&2
    exit 2
    ;;
esac
