"""The throughput table of ``e2e.json``: each engine's best tokens/s per input length, and
a run's rows merged into the table already there (rows of the same device and setup stay;
a run of another dense backend adds its columns to the table's rows).
"""

from __future__ import annotations

import re


def _dense_columns(cases: list[dict], dense_backend: str) -> dict[str, str]:
    """Backend -> its tokens/s column: the table's own dense backend in ``dense_tok_s``,
    any other measured into the same rows in ``dense_<backend>_tok_s``."""
    cols = {dense_backend: "dense_tok_s"}
    for c in cases:
        for k in c:
            m = re.fullmatch(r"dense_(\w+)_tok_s", k)
            if m:
                cols.setdefault(m.group(1), k)
    return cols


def max_throughput(cases: list[dict], dense_backend: str) -> list[dict]:
    """Per input length: each engine's best output tokens/s over the batches it ran (each
    at its own best batch, which for ParisKV may not fit the dense engine, and vice
    versa), and ParisKV's best over dense's. Dense is the faster of the backends the rows
    hold (``dense_backend``'s columns and any ``dense_<backend>_*`` ones), named in
    ``dense_backend``, with each backend's best in ``dense_best_by_backend``."""
    cols = _dense_columns(cases, dense_backend)
    out = []
    for n in dict.fromkeys(c["input_len"] for c in cases):
        mine = [c for c in cases if c["input_len"] == n]
        by_backend = {}
        for backend, col in cols.items():
            ran = [c for c in mine if c.get(col)]
            if ran:
                top = max(ran, key=lambda c, col=col: c[col])
                by_backend[backend] = {"batch": top["batch"], "tok_s": top[col]}
        ran = [c for c in mine if c.get("pariskv_tok_s")]
        if not by_backend or not ran:
            continue
        backend = max(by_backend, key=lambda b: by_backend[b]["tok_s"])
        d = by_backend[backend]
        p = max(ran, key=lambda c: c["pariskv_tok_s"])
        out.append(
            {
                "input_len": n,
                "dense_backend": backend,
                "dense_best_batch": d["batch"],
                "dense_best_tok_s": d["tok_s"],
                "pariskv_best_batch": p["batch"],
                "pariskv_best_tok_s": p["pariskv_tok_s"],
                "ratio": p["pariskv_tok_s"] / d["tok_s"],
                "dense_best_by_backend": by_backend,
            }
        )
    return out


#: The dense backend a throughput table is kept for (ParisKV runs on it); a run of another
#: dense backend adds its columns to that table's rows.
TABLE_DENSE_BACKEND = "flashinfer"


def _merge_other_backend(old: dict, new: dict, device: str, commit: str) -> dict:
    """A run whose dense engine used another backend (``new["dense_backend"]``, e.g. fa3)
    into ``old``'s table (same device and setup): its dense figures become that row's
    ``dense_<backend>_*`` columns, with the commit they were measured at; ParisKV's columns
    stay the table's own; rows of batches the table lacks are added with the new dense
    columns and ParisKV's from the run."""
    be = new["dense_backend"]
    cases = {(c["input_len"], c["batch"]): dict(c) for c in old["cases"]}
    for c in new["cases"]:
        extra = {f"dense_{be}_{k[len('dense_'):]}": v for k, v in c.items()
                 if k.startswith("dense_") and v is not None}  # fmt: skip
        extra[f"dense_{be}_git_commit"] = commit
        key = (c["input_len"], c["batch"])
        if key in cases:
            cases[key] |= extra
        else:
            base = {k: v for k, v in c.items() if not k.startswith("dense_") and k != "speedup"}
            cases[key] = base | extra | {"device": device, "git_commit": commit}
    merged = sorted(cases.values(), key=lambda c: (c["input_len"], c["batch"]))
    return old | {"cases": merged, "max_throughput": _best_on(merged, old["dense_backend"], device)}


def _best_on(cases: list[dict], dense_backend: str, device: str) -> list[dict]:
    """:func:`max_throughput` of a merged table, each entry marked with ``device``."""
    return [b | {"device": device} for b in max_throughput(cases, dense_backend)]


def adds_backend_columns(old: dict | None, new: dict, device: str) -> bool:
    """Whether ``new``, a run whose dense engine used another backend than
    :data:`TABLE_DENSE_BACKEND`, joins ``old`` as that backend's columns: ``old`` is a
    table of the same device and setup (config, output length)."""
    return (
        old is not None
        and new["dense_backend"] != TABLE_DENSE_BACKEND
        and old.get("dense_backend") == TABLE_DENSE_BACKEND
        and all(old.get(k) == new.get(k) for k in ("config", "output_len"))
        and any(c.get("device") == device for c in old.get("cases", []))
    )


def merge_throughput_results(old: dict | None, new: dict, device: str, commit: str) -> dict:
    """The throughput table after a run: ``new``'s rows, each marked with ``device`` and
    ``commit``, replace the rows of the same (input, batch); the other rows of ``old`` stay
    when they were measured on the same kind of device with the same setup (config, output
    length, dense backend), so a run of some inputs or batches does not drop the rest.
    A run of a dense backend other than :data:`TABLE_DENSE_BACKEND` adds its columns to a
    table of the same device and setup instead (:func:`_merge_other_backend`).
    ``max_throughput`` is recomputed over the merged rows."""
    if adds_backend_columns(old, new, device):
        return _merge_other_backend(old, new, device, commit)
    rows = [c | {"device": device, "git_commit": commit} for c in new["cases"]]
    same = old is not None and all(
        old.get(k) == new.get(k) for k in ("config", "output_len", "dense_backend")
    )
    kept = []
    if same:
        ran = {(c["input_len"], c["batch"]) for c in rows}
        kept = [
            c
            for c in old.get("cases", [])
            if (c["input_len"], c["batch"]) not in ran and c.get("device") == device
        ]
    cases = sorted(kept + rows, key=lambda c: (c["input_len"], c["batch"]))
    kept_inputs = {str(c["input_len"]) for c in kept}  # their bandwidth and engine stats stay
    by_input = {k: v for k, v in (old or {}).get("hbm_copy_gbs_by_input", {}).items()
                if k in kept_inputs}  # fmt: skip
    by_input |= {str(n): new["hbm_copy_gbs"] for n in {c["input_len"] for c in rows}}
    engines = {k: v for k, v in (old or {}).get("engines", {}).items() if k in kept_inputs}
    engines |= new["engines"]
    return new | {
        "cases": cases,
        "engines": engines,
        "hbm_copy_gbs_by_input": by_input,
        "max_throughput": _best_on(cases, new["dense_backend"], device),
    }
