from prometheus_client import CollectorRegistry

from sglang_pariskv.metrics import BatchCounts, ParisKVMetrics


def test_counters_accumulate_per_label_set():
    reg = CollectorRegistry()
    m = ParisKVMetrics({"model_name": "m", "tp_rank": "0"}, registry=reg)
    m.add(BatchCounts(tokens_encoded=1000, prefix_tokens_reused=4000))
    m.add(
        BatchCounts(
            sparse_request_steps=2,
            dense_request_steps=1,
            attended_tokens=4000,
            context_tokens=100_000,
            tokens_encoded=3,
        )
    )
    m.add(BatchCounts(sparse_request_steps=2, attended_tokens=4000, context_tokens=60_000))
    lab = {"model_name": "m", "tp_rank": "0"}

    def val(name):
        return reg.get_sample_value(f"sglang:pariskv_{name}", lab)

    assert val("tokens_encoded_total") == 1003
    assert val("prefix_tokens_reused_total") == 4000
    assert val("sparse_request_steps_total") == 4
    assert val("dense_request_steps_total") == 1
    assert val("attended_tokens_total") == 8000
    assert val("context_tokens_total") == 160_000
    assert val("attended_fraction") == 4000 / 60_000  # the last sparse batch
