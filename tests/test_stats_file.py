"""The stats files benchmarks read: atomic per-process files, rank 0 counted once."""

import json

from sglang_pariskv.stats_file import read_stats_dir, stats_path, write_stats


def test_rank0_files_are_summed_and_other_ranks_ignored(tmp_path):
    p0, p1 = stats_path(tmp_path / "new", 0), stats_path(tmp_path / "new", 1)
    assert p0.parent.is_dir()  # the folder is made once, when the path is
    assert p0.name.startswith("pariskv-tp0-") and p1.name.startswith("pariskv-tp1-")
    write_stats(p0, {"sparse_request_steps": 5, "attended_fraction": 0.5, "config": {}})
    write_stats(p1, {"sparse_request_steps": 5})  # the same requests, seen by rank 1
    (p0.parent / "pariskv-tp0-99.json").write_text(json.dumps({"sparse_request_steps": 2}))
    want = {"sparse_request_steps": 7, "attended_fraction": 0.5}
    assert read_stats_dir(p0.parent) == want
    assert not list(p0.parent.glob("*.tmp"))


def test_an_empty_directory_reads_as_nothing_ran(tmp_path):
    assert read_stats_dir(tmp_path) == {}


def test_the_writer_thread_keeps_file_io_off_the_callers_thread(tmp_path, monkeypatch):
    """notify() returns at once even when a write is slow, and flush() leaves the newest
    counters on disk (changes made while a write was under way included)."""
    import time

    from sglang_pariskv import stats_file

    real_write = stats_file.write_stats

    def slow_write(path, snapshot):
        time.sleep(0.05)
        real_write(path, snapshot)

    monkeypatch.setattr(stats_file, "write_stats", slow_write)
    counters = {"decode_steps": 0}
    writer = stats_file.StatsWriter(tmp_path / "s.json", lambda: dict(counters), interval=0.0)
    t0 = time.perf_counter()
    for _ in range(200):
        counters["decode_steps"] += 1
        writer.notify()
    assert time.perf_counter() - t0 < 0.05  # 200 changes cost less than one write
    assert writer.flush()
    assert json.loads((tmp_path / "s.json").read_text()) == {"decode_steps": 200}


def test_a_failed_write_is_reported_once_and_the_writer_keeps_going(tmp_path, caplog):
    """A removed folder (or a full disk) fails one write: the thread warns, survives, and
    writes again at the next change once the folder is back."""
    from sglang_pariskv import stats_file

    folder = tmp_path / "stats"
    counters = {"decode_steps": 1}
    writer = stats_file.StatsWriter(folder / "s.json", lambda: dict(counters), interval=0.0)
    writer.notify()
    assert not writer.flush(timeout=0.3)  # nothing on disk: the folder does not exist
    writer.notify()
    assert not writer.flush(timeout=0.3)
    assert caplog.text.count("not written") == 1
    folder.mkdir()
    counters["decode_steps"] = 7
    writer.notify()
    assert writer.flush()
    assert json.loads((folder / "s.json").read_text()) == {"decode_steps": 7}
