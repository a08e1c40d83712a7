"""Where a decode step's GPU time goes, dense vs ParisKV: per-kernel totals from SGLang's
own torch-profiler hook, same prompts, same run.

    python benchmarks/profile_decode.py --input-len 32768 --batch 1 --steps 8 --out $OUT

Each engine (Llama-3.1-8B shape, dummy weights, CUDA graphs on) prefills the prompts,
then profiles ``--steps`` decode steps (``Engine.start_profile(num_steps=...)``, GPU
activity only) and writes its chrome trace. The kernels of each trace are summed by name
and divided by the number of steps; the table printed last lists the kernels whose time
per step differs most between the two engines, which is the ParisKV overhead to attack.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_e2e as e2e  # noqa: E402


def kernel_times_us(trace_files: list[Path]) -> Counter:
    """Summed duration (µs) per GPU kernel / memcpy name over chrome traces."""
    total: Counter = Counter()
    for f in trace_files:
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt") as fh:
            events = json.load(fh)
        events = events.get("traceEvents", events) if isinstance(events, dict) else events
        for ev in events:
            if ev.get("ph") == "X" and ev.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
                total[ev["name"]] += float(ev.get("dur", 0.0))
    return total


def _profile_worker(model_dir, pariskv, input_len, batch, steps, out_dir, out_q):
    try:
        import random

        eng = e2e._engine(
            model_dir,
            pariskv,
            load_format="dummy",
            skip_tokenizer_init=True,
            context_length=input_len + 256,
            max_running_requests=batch,
            mem_fraction_static=0.85,
        )
        rng = random.Random(0)
        prompts = [[rng.randrange(1000, 100000) for _ in range(input_len)] for _ in range(batch)]
        eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1})
        eng.start_profile(output_dir=out_dir, num_steps=steps + 2, activities=["GPU"])
        eng.generate(
            input_ids=prompts,
            sampling_params={"max_new_tokens": steps + 64, "ignore_eos": True},
        )
        eng.shutdown()
        out_q.put({"files": [str(p) for p in Path(out_dir).rglob("*.trace.json*")]})
    except Exception as e:
        import traceback

        out_q.put({"error": f"{e!r}\n{traceback.format_exc()}"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input-len", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="profile-")))
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    model_dir = Path(tempfile.mkdtemp(prefix="llama8b-shape-"))
    (model_dir / "config.json").write_text(json.dumps(e2e.LLAMA_8B))
    cfg = {"topk": 2048, "sink": 64, "local": 256, "dense_threshold": 8192}
    per_step = {}
    for mode, pk in (("dense", None), ("pariskv", cfg)):
        out_dir = tempfile.mkdtemp(prefix=f"trace-{mode}-")
        res = e2e._run_isolated(
            _profile_worker, str(model_dir), pk, args.input_len, args.batch, args.steps, out_dir
        )
        # The profiled window covers steps + 2 scheduler steps, all decode after the
        # radix-cached one-token extend; normalise by the decode steps profiled.
        times = kernel_times_us([Path(f) for f in res["files"]])
        per_step[mode] = {k: v / (args.steps + 2) for k, v in times.items()}
    names = set(per_step["dense"]) | set(per_step["pariskv"])
    rows = sorted(
        names,
        key=lambda n: -abs(per_step["pariskv"].get(n, 0) - per_step["dense"].get(n, 0)),
    )
    summary = {
        "input_len": args.input_len,
        "batch": args.batch,
        "steps": args.steps,
        "device_info": e2e._device_info(),
        "total_us_per_step": {m: sum(v.values()) for m, v in per_step.items()},
        "kernels_us_per_step": per_step,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_decode.json").write_text(json.dumps(summary, indent=2))
    print(f"{'kernel':<70} {'dense us':>9} {'pkv us':>9}")
    for n in rows[: args.top]:
        d, p = per_step["dense"].get(n, 0), per_step["pariskv"].get(n, 0)
        print(f"{n[:70]:<70} {d:>9.1f} {p:>9.1f}")
    t = summary["total_us_per_step"]
    print(f"{'TOTAL GPU time per step':<70} {t['dense']:>9.1f} {t['pariskv']:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
