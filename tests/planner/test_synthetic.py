from __future__ import annotations

import pytest
from trace_factory import OLMOE

from planner.routing.synthetic import fit_routing_stats, synthesize
from planner.routing.statistics import trace_stats
from runtime.contracts.traces import load_trace, write_trace


@pytest.fixture(scope="module")
def olmoe_fit():
    trace = load_trace(OLMOE)
    return trace, fit_routing_stats(trace)


def test_synthetic_trace_reproduces_olmoe_reuse_and_skew(olmoe_fit):
    trace, stats = olmoe_fit
    real = trace_stats(trace)
    fake = trace_stats(synthesize(stats, 16, 64, 8, tokens=1500, seed=3))
    assert fake.mean_next_token_reuse == pytest.approx(real.mean_next_token_reuse, abs=0.02)
    assert fake.mean_skew == pytest.approx(real.mean_skew, abs=0.03)
    for a, b in zip(real.layers, fake.layers):  # layer by layer, looser: 1500 tokens of sampling noise
        assert b.next_token_reuse == pytest.approx(a.next_token_reuse, abs=0.05)
        assert b.skew == pytest.approx(a.skew, abs=0.06)


def test_synthetic_trace_is_seeded_marked_and_writable(olmoe_fit, tmp_path):
    _, stats = olmoe_fit
    a, b = synthesize(stats, 4, 8, 2, tokens=50, seed=7), synthesize(stats, 4, 8, 2, tokens=50, seed=7)
    assert a == b and a != synthesize(stats, 4, 8, 2, tokens=50, seed=8)
    h = a.header
    assert (h.source, h.num_layers, h.num_experts, h.top_k) == ("synthetic", 4, 8, 2)
    assert h.extra["fitted_from"] == "olmoe-1b-7b-decode-299.jsonl" and h.extra["seed"] == 7
    assert len(h.extra["params"]) == 4 and {"zipf_exponent", "keep"} <= set(h.extra["params"][0])
    assert load_trace(write_trace(tmp_path / "s.jsonl", a)) == a


def test_rescaled_trace_keeps_skew_and_reuse_between_uniform_and_maximum(olmoe_fit):
    _, stats = olmoe_fit
    s = trace_stats(synthesize(stats, 32, 8, 2, tokens=600, seed=1))
    # Mixtral shape: uniform skew 1/8 and reuse 2/8; OLMoE sits about 30% and 35% of the way to the maximum
    assert 0.18 < s.mean_skew < 0.30 and 0.45 < s.mean_next_token_reuse < 0.58
    with pytest.raises(ValueError, match="top_k"):
        synthesize(stats, 4, 8, 9, tokens=10, seed=0)
