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


def test_masked_rows_are_not_counted():
    hists = RequestHistograms(max_reqs=2, num_kv_heads=1, head_dim=8, num_layers=1, device="cpu")
    signs = torch.tensor([[[7]], [[9]]], dtype=torch.uint8)
    hists.add(0, signs, torch.tensor([1, 0]), weight=torch.tensor([True, False]))
    assert hists.layers[0][1, 0, 0, 7] == 1 and hists.layers[0].sum() == 1


def test_add_decode_reads_the_new_keys_from_the_pool_and_skips_padding():
    gen = torch.Generator().manual_seed(3)
    signs = torch.randint(0, 256, (30, 2, 2), generator=gen).to(torch.uint8)
    a = RequestHistograms(max_reqs=3, num_kv_heads=2, head_dim=16, num_layers=1, device="cpu")
    b = RequestHistograms(max_reqs=3, num_kv_heads=2, head_dim=16, num_layers=1, device="cpu")
    loc, rpi, seq = torch.tensor([4, 9, 0]), torch.tensor([2, 0, 1]), torch.tensor([5, 8, 1])
    a.add_decode(0, signs, loc, rpi, seq)
    b.add(0, signs[loc[:2]], rpi[:2])
    assert torch.equal(a.layers[0], b.layers[0]) and a.layers[0][1].sum() == 0
