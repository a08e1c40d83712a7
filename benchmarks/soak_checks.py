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
#: The backend's measured allocations against the plan (``attention.memory_check``); it
#: logs the line again each time its total changes (after CUDA-graph capture): the last
#: line of the first TP rank counts.
_MEMORY = re.compile(
    r"^(?:\[[^\]]*?(TP\d+)[^\]]*\] |\[[^\]]*\] )?ParisKV backend memory: ([\d.]+) MiB "
    r"allocated on the GPU, ([\d.]+) MiB planned",
    re.M,
)
#: Allocated may differ from planned by at most this fraction of planned.
MEMORY_TOLERANCE = 0.02
#: The line that ends a Python traceback: the exception's type and message.
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b.*$")
#: At most this many lines of a traceback go into the results.
ERROR_LINES = 40


def parse_memory_log(text: str) -> dict:
    """ParisKV's planned and allocated GPU memory from a server log: the backend's last
    "backend memory" line of the first TP rank (allocated as measured by PyTorch's
    allocator, planned as the pool sizing took it out of the pool), plus the pool sizing's
    token counts and the code pool's size. None where absent."""
    out: dict = {"memory_planned_bytes": None, "memory_allocated_bytes": None}
    if m := _PLANNED.search(text):
        out["kv_tokens_before_reserve"] = int(m.group(1))
        out["kv_tokens_reserved"] = int(m.group(3))
    if m := _BACKEND.search(text):
        out["codes_mib"] = float(m.group(1))
    lines = _MEMORY.findall(text)
    if lines:
        rank = lines[0][0]
        _, allocated, planned = [x for x in lines if x[0] == rank][-1]
        out["memory_allocated_bytes"] = round(float(allocated) * 2**20)
        out["memory_planned_bytes"] = round(float(planned) * 2**20)
    return out


def server_error(text: str) -> str | None:
    """The server log's first traceback, up to the exception it raised (at most
    ``ERROR_LINES`` lines, the exception line kept): why a crashed server died, in the
    results rather than only in a log left on the GPU host. None without a traceback."""
    lines = text.splitlines()
    start = next(
        (i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line), None
    )
    if start is None:
        return None
    block = lines[start:]
    end = next((i for i, line in enumerate(block) if _RAISED.match(line)), len(block) - 1)
    block = block[: end + 1]
    if len(block) > ERROR_LINES:
        block = block[: ERROR_LINES - 2] + ["...", block[-1]]
    return "\n".join(block)


def memory_problems(res: dict) -> list[str]:
    """Allocated against planned: missing, or off by more than ``MEMORY_TOLERANCE``."""
    planned, allocated = res.get("memory_planned_bytes"), res.get("memory_allocated_bytes")
    if planned is None or allocated is None:
        return ["no 'ParisKV backend memory' line in the server log (allocated vs planned)"]
    if abs(allocated - planned) > MEMORY_TOLERANCE * planned:
        return [
            f"ParisKV allocated {allocated / 2**20:.1f} MiB on the GPU against "
            f"{planned / 2**20:.1f} MiB planned (more than {MEMORY_TOLERANCE:.0%} apart)"
        ]
    return []


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
    if res["crashes"]:  # first: it explains most of what follows
        error = res.get("server_error")
        raised = f" ({error.splitlines()[-1]})" if error else ""
        why.append(f"the server process exited{raised}")
    if res["errors"]:
        why.append(f"{res['errors']} well-formed requests failed")
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
    why += res["counter_problems"]  # empty for a plain SGLang control
    if res.get("engine", "pariskv") == "pariskv":  # a control has no ParisKV memory
        why += memory_problems(res)
    return why
