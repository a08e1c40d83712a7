"""prefill_log: a long prompt's chunks and their times, read from an SGLang server log whose
lines are written here in SGLang's format with known stamps and token counts."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import prefill_log  # noqa: E402

T0 = datetime(2026, 12, 6, 22, 45, 1)


def stamp(at: datetime, tag: str = "") -> str:
    return f"[{at:%Y-%m-%d %H:%M:%S}{' ' + tag if tag else ''}]"


def prefill_line(at: datetime, new: int, usage: float = 0.0, tag: str = "") -> str:
    """One ``Prefill batch`` line as SGLang 0.5.17 logs it (``tag``: a rank, "TP1")."""
    return (
        f"{stamp(at, tag)} Prefill batch, #new-seq: 1, #new-token: {new}, "
        f"#cached-token: 0, token usage: {usage:.2f}, #running-req: 0, #queue-req: 0, "
        f"#pending-token: 0, cuda graph: True, input throughput (token/s): 1333.10"
    )


def server_log(batches: list[tuple[int, int]], flush_after: int | None = None, tag="") -> str:
    """A log holding the given (seconds after T0, new tokens) prefill batches, between the
    other lines a server writes; a cache flush after the first ``flush_after`` batches."""
    lines = [
        "$ python -m sglang.launch_server --model-path m",
        "[2026-12-06 22:44:00] Load weight end.",
    ]
    for i, (sec, new) in enumerate(batches):
        at = T0 + timedelta(seconds=sec)
        if i == flush_after:
            lines.append(f"{stamp(at, tag)} Cache flushed successfully!")
        lines += [
            prefill_line(at, new, tag=tag),
            f"[{at:%Y-%m-%d %H:%M:%S}] INFO:     127.0.0.1:1 - "
            '"POST /v1/completions HTTP/1.1" 200 OK',
        ]
    end = T0 + timedelta(seconds=batches[-1][0] + 3)
    lines.append(
        f"[{end:%Y-%m-%d %H:%M:%S}] Decode batch, #running-req: 1, #token: 900, "
        "gen throughput (token/s): 98.1"
    )
    return "\n".join(lines) + "\n"


def test_the_last_prompts_chunks_and_their_seconds():
    # warm-up (6 tokens, then 2 chunks of 8), then the prompt: 8 + 8 + 8 + 5 tokens
    warm = [(0, 6), (2, 8), (3, 8)]
    prompt = [(10, 8), (11, 8), (14, 8), (20, 5)]
    got = prefill_log.chunk_progress(server_log(warm + prompt), 29)
    assert got == {
        "chunk_tokens": [8, 8, 8, 5],
        "prefix_tokens": [0, 8, 16, 24],
        "seconds": [0.0, 1.0, 4.0, 10.0],
    }
    assert [n for _, n in prefill_log.prefill_batches(server_log(warm + prompt))] == [
        6, 8, 8, 8, 8, 8, 5,
    ]  # fmt: skip


@pytest.mark.parametrize("length", [30, 28, 100])
def test_a_prompt_the_last_batches_do_not_add_up_to_is_not_reported(length):
    log = server_log([(0, 6), (10, 8), (11, 8), (14, 8), (20, 5)])
    assert prefill_log.chunk_progress(log, length) is None


def test_a_missing_log_gives_none(tmp_path):
    assert prefill_log.read_chunk_progress(tmp_path / "absent.log", 8) is None
    (tmp_path / "s.log").write_text(server_log([(0, 8)]))
    assert prefill_log.read_chunk_progress(tmp_path / "s.log", 8)["seconds"] == [0.0]


WARM = [(0, 6), (2, 8), (3, 8)]  # SGLang's warm-up (6 tokens), then 2 chunks of 8


def test_a_cut_short_prompt_is_the_batches_after_the_last_flush():
    # the prompt's chunks so far: 8 + 8 + 8 (its length is unknown to the reader)
    log = server_log(WARM + [(10, 8), (11, 8), (14, 8)], flush_after=len(WARM))
    assert prefill_log.chunk_progress(log) == {
        "chunk_tokens": [8, 8, 8],
        "prefix_tokens": [0, 8, 16],
        "seconds": [0.0, 1.0, 4.0],
    }
    assert prefill_log.chunk_progress(server_log(WARM, flush_after=None)) is not None
    assert prefill_log.chunk_progress("[2026-12-06 22:44:00] Load weight end.\n") is None


def test_only_the_first_ranks_lines_count():
    # ranks log the same batches; a line of TP1 must not count twice
    log0 = server_log(WARM + [(10, 8), (11, 5)], flush_after=len(WARM), tag="TP0")
    log1 = server_log(WARM + [(10, 8), (11, 5)], flush_after=len(WARM), tag="DP0 TP1")
    both = log0 + log1
    assert prefill_log.chunk_progress(both, 13)["chunk_tokens"] == [8, 5]
    assert prefill_log.chunk_progress(both)["chunk_tokens"] == [8, 5]
    assert len(prefill_log.prefill_batches(log1)) == 0
