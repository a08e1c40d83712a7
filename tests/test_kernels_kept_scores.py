"""Kept score rows (kernels/kept_scores.py) against a plain-Python model of the rule."""

import random

import torch

from sglang_pariskv.kernels.kept_scores import (
    KEPT_SCORES_BYTES,
    KeptScoreRows,
    kept_rows_for,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


class Reference:
    """The rule, one request at a time: a request that owns a row keeps it (fresh unless
    its last step was seq - 1); the others take rows no request of the step owns, lowest
    first, in batch order; dense requests and those left without a row use scratch."""

    def __init__(self, layers: int, kept: int, max_batch: int):
        self.layers, self.kept, self.max_batch = layers, kept, max_batch
        self.owner = [-1] * kept
        self.last = [-1] * kept

    def step(self, rpi, seq, dense):
        own = {}
        for i, p in enumerate(rpi):
            if not dense[i] and p in self.owner:
                own[i] = self.owner.index(p)
        free = [k for k in range(self.kept) if k not in own.values()]
        rows, fresh = [], []
        for i in range(len(rpi)):
            if dense[i]:
                row = -1
            elif i in own:
                row = own[i]
            else:
                row = free.pop(0) if free else -1
            fresh.append(int(i not in own or self.last[own[i]] != seq[i] - 1))
            rows.append(row)
        for i, row in enumerate(rows):
            if row >= 0:
                self.owner[row], self.last[row] = rpi[i], seq[i]
        per_layer = [
            [layer * self.kept + row if row >= 0 else self.layers * self.kept + i
             for i, row in enumerate(rows)]
            for layer in range(self.layers)
        ]  # fmt: skip
        return per_layer, fresh

    def forget(self, rpis):
        self.owner = [-1 if o in rpis else o for o in self.owner]


def run_step(kept: KeptScoreRows, rpi, seq, dense):
    kept.assign(
        torch.tensor(rpi, dtype=torch.int32, device=DEV),
        torch.tensor(seq, dtype=torch.int64, device=DEV),
        torch.tensor(dense, dtype=torch.int64, device=DEV),
    )
    r = len(rpi)
    return kept.rows[:, :r].cpu().tolist(), kept.fresh[:r].cpu().tolist()


def test_rows_follow_requests_through_reorders_joins_gaps_and_prefills():
    layers, k, rmax = 3, 2, 4
    kept, ref = KeptScoreRows(layers, k, rmax, DEV), Reference(layers, k, rmax)
    steps = [
        ([1, 3, 5], [10, 20, 30], [0, 0, 1]),  # 5 is dense: a scratch row
        ([3, 1, 5], [21, 11, 31], [0, 0, 1]),  # reordered: same rows, not fresh
        ([3, 7, 5, 9], [22, 40, 32, 50], [0, 0, 1, 0]),  # 1 left: 7 takes its row
        ([3, 7, 9], [24, 41, 51], [0, 0, 0]),  # 3 skipped a step: fresh
    ]
    got = [run_step(kept, *s) for s in steps]
    want = [ref.step(*s) for s in steps]
    assert got == want
    rows, fresh = got[1]
    assert rows[0] == [1, 0, 3 * 2 + 2] and fresh == [0, 0, 1]
    assert got[2][0][0][:2] == [1, 0] and got[2][1] == [0, 1, 1, 1]  # 9 got no row
    # a prefill of 7's row: its scores are no longer the request's
    kept.forget(torch.tensor([7], device=DEV))
    ref.forget([7])
    assert run_step(kept, [3, 7], [25, 42], [0, 0]) == ref.step([3, 7], [25, 42], [0, 0])
    assert kept.fresh[:2].tolist() == [0, 1]


def test_random_steps_match_the_reference():
    rnd = random.Random(0)
    layers, k, rmax = 2, 5, 9
    kept, ref = KeptScoreRows(layers, k, rmax, DEV), Reference(layers, k, rmax)
    seq = {p: rnd.randint(100, 200) for p in range(20)}
    for _ in range(60):
        rpi = rnd.sample(range(20), rnd.randint(1, rmax))
        for p in rpi:
            seq[p] += 1 if rnd.random() < 0.85 else rnd.randint(2, 4)
        dense = [int(rnd.random() < 0.15) for _ in rpi]
        s = [seq[p] for p in rpi]
        assert run_step(kept, rpi, s, dense) == ref.step(rpi, s, dense)
        if rnd.random() < 0.2:
            gone = rnd.sample(range(20), 3)
            kept.forget(torch.tensor(gone, device=DEV))
            ref.forget(gone)


def test_no_kept_rows_means_scratch_rows_and_fresh():
    kept = KeptScoreRows(3, 0, 4, DEV)
    rows, fresh = run_step(kept, [4, 2], [50, 60], [0, 0])
    assert rows == [[0, 1]] * 3 and fresh == [1, 1]


def test_kept_rows_fill_the_byte_budget():
    per = 32 * 8 * 131072
    assert kept_rows_for(256, 32, 8, 131072) == KEPT_SCORES_BYTES // per == 16
    assert kept_rows_for(5, 32, 8, 131072) == 5
    assert kept_rows_for(256, 28, 4, 2**24) == 1  # at least one
