"""What the soak reads from the server and how it judges the run: ParisKV's planned and
allocated memory from the server log, its counters against what the clients were served,
and the verdict.

The counters must move the way the served traffic says (codes encoded; sparse steps for
requests above the dense threshold, dense steps below it): a plugin that stopped
retrieving, or was never loaded, fails the soak instead of passing it as dense.
"""

from __future__ import annotations

import re

PK = "sglang:pariskv_"

_PLANNED = re.compile(
    r"ParisKV: (\d+) tokens fit SGLang's KV budget; ([\d.]+) GiB \((\d+) tokens\) are kept"
)
_BACKEND = re.compile(r"ParisKV backend: codes ([\d.]+) MiB, decode workspace ([\d.]+) MiB")
_HOT_CACHE = re.compile(
    r"ParisKV offload: host pool ([\d.]+) GiB, hot cache (\d+) lines/layer "
    r"\(([\d.]+) MiB\)"
)


def parse_memory_log(text: str) -> dict:
    """ParisKV's planned and allocated backend memory from a server log (first TP rank's
    lines): planned = the GiB the pool sizing keeps for the backend; allocated = the
    decode workspace (+ hot cache) the backend logs. None where absent."""
    out: dict = {"memory_planned_bytes": None, "memory_allocated_bytes": None}
    if m := _PLANNED.search(text):
        out["memory_planned_bytes"] = round(float(m.group(2)) * 2**30)
        out["kv_tokens_before_reserve"] = int(m.group(1))
        out["kv_tokens_reserved"] = int(m.group(3))
    if m := _BACKEND.search(text):
        ws = float(m.group(2))
        hot = float(h.group(3)) if (h := _HOT_CACHE.search(text)) else 0.0
        out["memory_allocated_bytes"] = round((ws + hot) * 2**20)
        out["codes_mib"] = float(m.group(1))
    return out


def check_counters(delta: dict | None, tally: dict) -> list[str]:
    """Problems with the ParisKV counters' movement over the load given what was served."""
    if delta is None:
        return ["/metrics served no sglang:pariskv_* counters (was the plugin loaded?)"]
    problems = []
    served = tally["requests"] - tally["errors"] - tally["malformed_total"]
    if served > 0 and not delta.get(f"{PK}tokens_encoded_total", 0) > 0:
        problems.append(f"{served} requests served but {PK}tokens_encoded_total did not grow")
    if tally["sparse_expected"] and not delta.get(f"{PK}sparse_request_steps_total", 0) > 0:
        problems.append(
            f"{tally['sparse_expected']} requests decoded above the dense threshold but "
            f"{PK}sparse_request_steps_total did not grow"
        )
    if tally["dense_expected"] and not delta.get(f"{PK}dense_request_steps_total", 0) > 0:
        problems.append(
            f"{tally['dense_expected']} requests decoded below the dense threshold but "
            f"{PK}dense_request_steps_total did not grow"
        )
    return problems


def verdict(res: dict) -> list[str]:
    """Why the run failed (empty: it passed)."""
    why = []
    if res["errors"]:
        why.append(f"{res['errors']} well-formed requests failed")
    if res["crashes"]:
        why.append("the server process exited")
    if res["hung_clients"]:
        why.append(f"{res['hung_clients']} clients still running after their timeouts")
    if res["malformed_rejected_4xx"] != res["malformed_total"]:
        why.append(
            f"{res['malformed_total'] - res['malformed_rejected_4xx']} of "
            f"{res['malformed_total']} malformed requests not answered 4xx"
        )
    fill = res["pool_fill"]
    if fill is None:
        why.append("the KV pool was not filled (no free-token count on the idle server)")
    elif fill["errors"]:
        why.append(f"{fill['errors']} of {fill['requests']} requests filling the KV pool failed")
    before, after = res["free_tokens_idle_before"], res["free_tokens_idle_after"]
    if before is None or after != before:
        why.append(f"free KV tokens on the idle server: {before} before, {after} after")
    if not res["idle_after"]:
        why.append("the server did not become idle after the load")
    why += res["counter_problems"]
    return why
