"""The stats files benchmarks read: atomic per-process files, rank 0 counted once."""

import json

from sglang_pariskv.stats_file import read_stats_dir, stats_path, write_stats


def test_rank0_files_are_summed_and_other_ranks_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_PARISKV_STATS_DIR", str(tmp_path))
    p0, p1 = stats_path(0), stats_path(1)
    assert p0.name.startswith("pariskv-tp0-") and p1.name.startswith("pariskv-tp1-")
    write_stats(p0, {"sparse_request_steps": 5, "attended_fraction": 0.5, "config": {}})
    write_stats(p1, {"sparse_request_steps": 5})  # the same requests, seen by rank 1
    (tmp_path / "pariskv-tp0-99.json").write_text(json.dumps({"sparse_request_steps": 2}))
    assert read_stats_dir(tmp_path) == {"sparse_request_steps": 7, "attended_fraction": 0.5}
    assert not list(tmp_path.glob("*.tmp"))


def test_no_directory_no_files(tmp_path, monkeypatch):
    monkeypatch.delenv("SGLANG_PARISKV_STATS_DIR", raising=False)
    assert stats_path(0) is None
    assert read_stats_dir(tmp_path) == {}
