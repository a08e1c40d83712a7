"""The RSQ-IP estimator on real post-RoPE keys and queries of SmolLM2-135M-Instruct."""

import pytest
import torch

from pariskv_tools.workloads import capture as cap_mod
from pariskv_tools.workloads import task_generators, tasks
from pariskv_tools.workloads.smollm2 import load_smollm2
from sglang_pariskv.codec import encode_keys, estimate_inner_products, prepare_query


@pytest.fixture(scope="module")
def captured():
    model, tok = load_smollm2()
    task = task_generators.passkey(tok, 1500, depth=0.5, seed=3)
    ids = torch.tensor(tasks.format_chat(tok, task))
    return cap_mod.capture(model, tok, ids, 8, progress=False)


@pytest.mark.slow
def test_estimator_on_real_keys(captured):
    """Pooled over every layer, KV head and decode query: the estimate of q.k tracks the
    float64 exact value (Pearson r >= 0.97) without bias (|mean error| < 2% of its std)."""
    ests, exacts = [], []
    for keys, queries in zip(captured.keys, captured.queries):
        # keys [N, Hkv, D]; queries [steps, Hq, D]: score each step's group-mean query
        # against the keys it can see.
        hkv = keys.shape[1]
        codes = encode_keys(keys)
        for step, pos in enumerate(captured.query_positions.tolist()):
            q = queries[step][None]  # [1, Hq, D]
            pq = prepare_query(q.double(), hkv)
            n = pos + 1
            est = estimate_inner_products(
                codes.index(slice(0, n)), pq.blocks[0], pq.norm[0]
            )  # [n, Hkv]
            qm = q.double().reshape(hkv, -1, q.shape[-1]).mean(1)  # group-mean query
            exact = torch.einsum("nhd,hd->nh", keys[:n].double(), qm)
            ests.append(est.double().flatten())
            exacts.append(exact.flatten())
    est, exact = torch.cat(ests), torch.cat(exacts)
    r = torch.corrcoef(torch.stack([est, exact]))[0, 1].item()
    err = est - exact
    print(
        f"real keys: r={r:.4f} bias/std={err.mean().item() / err.std().item():.4f} "
        f"pairs={est.numel()}"
    )
    assert est.numel() > 1_000_000
    assert r >= 0.97, r
    assert abs(err.mean().item()) < 0.02 * err.std().item(), (err.mean(), err.std())
