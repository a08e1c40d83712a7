import pytest
import torch

from sglang_pariskv.codec import centroid_histogram
from sglang_pariskv.index.histograms import RequestHistograms


def test_rebuild_then_add_equals_a_fresh_count():
    gen = torch.Generator().manual_seed(0)
    slots, h, d = 100, 2, 16
    signs = torch.randint(0, 256, (slots, h, d // 8), generator=gen).to(torch.uint8)
    req_to_token = torch.randperm(slots, generator=gen)[:60].reshape(3, 20).to(torch.int32)
    hists = RequestHistograms(max_reqs=3, num_kv_heads=h, head_dim=d, num_layers=1, device="cpu")
    reqs, lens = torch.tensor([2, 0]), torch.tensor([7, 12])
    hists.rebuild(0, signs, req_to_token, reqs, lens)
    for _ in range(3):  # three decode steps: each request appends its next token
        new = signs[req_to_token[reqs, lens].long()]
        hists.add(0, new, reqs)
        lens = lens + 1
    for r, n in zip(reqs.tolist(), lens.tolist()):
        toks = signs[req_to_token[r, :n].long()][None]
        want = centroid_histogram(toks, torch.tensor([n]))[0]
        assert torch.equal(hists.layers[0][r], want)
    assert hists.layers[0][1].sum() == 0  # untouched request slot


def test_duplicate_requests_in_one_add_accumulate():
    hists = RequestHistograms(max_reqs=1, num_kv_heads=1, head_dim=8, num_layers=1, device="cpu")
    hists.add(0, torch.tensor([[[5]], [[5]]], dtype=torch.uint8), torch.tensor([0, 0]))
    assert hists.layers[0][0, 0, 0, 5] == 2


def fresh_count(signs, req_to_token, r, n):
    """Brute force: the histogram of request ``r``'s first ``n`` tokens."""
    toks = signs[req_to_token[r, :n].long()][None]
    return centroid_histogram(toks, torch.tensor([n]))[0]


def test_count_decode_keeps_only_requests_above_the_limit_and_catches_up_once():
    """Request 0 starts above the limit (recounted at extend), request 1 starts below it
    and crosses it while decoding, request 2 stays below, and a padding row (length 1)
    rides along: after every step, the rows above the limit equal a fresh count and the
    others are still zero."""
    gen = torch.Generator().manual_seed(3)
    slots, h, d, limit = 200, 2, 16, 10
    signs = torch.randint(0, 256, (slots, h, d // 8), generator=gen).to(torch.uint8)
    rtt = torch.randperm(slots, generator=gen)[:180].reshape(3, 60).to(torch.int32)
    hists = RequestHistograms(max_reqs=4, num_kv_heads=h, head_dim=d, num_layers=2, device="cpu")
    hists.all.fill_(7)  # a previous owner's counts: extend must clear them
    reqs, lens = torch.tensor([0, 1, 2]), torch.tensor([15, 8, 3])
    hists.reset(reqs)
    hists.rebuild(1, signs, rtt, reqs[:1], lens[:1])  # extend recounts the long request
    assert hists.layers[1][3].sum() == 7 * h * (d // 8) * 256  # not extended: untouched
    for _step in range(6):
        lens = lens + 1
        rows = torch.cat([reqs, torch.tensor([3])])  # + a padding row
        seq = torch.cat([lens, torch.tensor([1])])
        hists.count_decode(1, signs, rtt, rows, seq, limit)
        for r, n in zip(reqs.tolist(), lens.tolist()):
            zero = torch.zeros(h, d // 8, 256, dtype=torch.int32)
            want = fresh_count(signs, rtt, r, n) if n > limit else zero
            assert torch.equal(hists.layers[1][r], want), (r, n)
    assert lens.tolist() == [21, 14, 9]  # request 1 crossed, request 2 did not
    assert hists.layers[0][:3].sum() == 0  # layer 0 was never counted


def test_count_decode_refuses_a_limit_that_would_count_padding_rows():
    hists = RequestHistograms(max_reqs=1, num_kv_heads=1, head_dim=8, num_layers=1, device="cpu")
    signs = torch.zeros(4, 1, 1, dtype=torch.uint8)
    rtt = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="limit 0"):
        hists.count_decode(0, signs, rtt, torch.tensor([0]), torch.tensor([1]), 0)


@pytest.mark.gpu
def test_a_recount_after_an_extend_reset_equals_a_fresh_count_on_the_gpu(cuda_device):
    """The GPU rebuild adds to rows the extend already zeroed (``zeroed=True``): after a
    reset it gives the count of the requests' tokens, not the stale counts plus them; the
    default re-zeroes first."""
    gen = torch.Generator().manual_seed(3)
    slots, h, d = 500, 2, 64
    signs = torch.randint(0, 256, (slots, h, d // 8), generator=gen).to(torch.uint8)
    rtt = torch.randperm(slots, generator=gen)[:400].reshape(4, 100).to(torch.int32)
    reqs, lens = torch.tensor([3, 1]), torch.tensor([90, 40])
    want = RequestHistograms(max_reqs=4, num_kv_heads=h, head_dim=d, num_layers=2, device="cpu")
    want.rebuild(1, signs, rtt, reqs, lens)
    dev = dict(device=cuda_device)
    got = RequestHistograms(max_reqs=4, num_kv_heads=h, head_dim=d, num_layers=2, **dev)
    got.all.fill_(7)  # stale counts of earlier requests in every slot
    got.reset(reqs.to(cuda_device))
    args = (signs.to(**dev), rtt.to(**dev), reqs.to(**dev), lens.to(**dev))
    got.rebuild(1, *args, max_len=90, zeroed=True)
    assert torch.equal(got.layers[1][reqs].cpu(), want.layers[1][reqs])
    got.layers[1][reqs] += 5
    got.rebuild(1, *args, max_len=90)  # not zeroed: re-zeroes
    assert torch.equal(got.layers[1][reqs].cpu(), want.layers[1][reqs])
    assert bool((got.layers[0][reqs] == 0).all()) and bool((got.layers[1][0] == 7).all())
