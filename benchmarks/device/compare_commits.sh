#!/usr/bin/env bash
# Retrieval kernels of several commits, side by side on one GPU (the host has no .git):
#
#   bash benchmarks/device/compare_commits.sh pack REV...          # here
#   bash benchmarks/device/compare_commits.sh run "B..." REV...    # on the host, one call
#
# `pack` writes each commit's package and retrieval benchmarks under .device-bundle/trees/REV
# (about 1 MB each; carry .device-bundle/trees). `run` times bench_retrieval_in_step.py (modes
# step and weights, 32 layers, 128K tokens per request) for each batch size in B and each
# commit, the working tree included as "tree", so that every batch's runs are adjacent, and
# prints each run's per-layer stage times (us) and step_ms; the JSON files go to $OUT (or
# /tmp/compare). Each tree builds its own kernels (the CUDA cache is keyed by the sources).
set -uo pipefail
mode=${1:-}
shift || true
case "$mode" in
pack)
    for rev in "$@"; do
        dir=.device-bundle/trees/$rev
        rm -rf "$dir" && mkdir -p "$dir"
        git archive "$rev" sglang_pariskv pariskv_tools benchmarks/bench_retrieval_in_step.py \
            benchmarks/bench_kernels.py pyproject.toml | tar -x -C "$dir"
        echo "packed $rev -> $dir"
    done
    ;;
run)
    batches=$1
    shift
    out=${OUT:-/tmp/compare}
    mkdir -p "$out"
    for b in $batches; do
        for rev in tree "$@"; do
            if [ "$rev" = tree ]; then dir=$PWD; else dir=$PWD/.device-bundle/trees/$rev; fi
            # the bench prints each mode's stage means and step_ms: keep those lines
            if (cd "$dir" && PYTHONPATH=$dir python3 benchmarks/bench_retrieval_in_step.py \
                --batch "$b" --modes step weights --out "$out/in_step_${rev}_b$b.json" 2>&1) \
                | grep -E '^(step|weights) ' | sed "s/^/$rev batch $b: /"; then :; else
                echo "$rev batch $b: no result"
            fi
        done
    done
    ;;
*)
    echo "usage: $0 pack REV... | run \"BATCHES\" REV..." >&2
    exit 2
    ;;
esac
