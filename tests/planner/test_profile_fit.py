"""The fits recover the rates that generated a table, and the profile's formula then reproduces the table."""
from __future__ import annotations

import pytest

from planner.profile import DenseRow, ExpertRow, Profile, expert_bytes, expert_flops
from planner.profile.fit import dense_layer_bytes, fit_expert_rates, fit_layer_overhead

OVERHEAD = 3e-5
GBPS = {1: 11.0, 2: 19.0}
GFLOPS = {1: 150.0, 2: 280.0}
SHAPES = ((1024, 3584), (4096, 14336))


def _time(h: int, i: int, tokens: int, threads: int) -> float:
    return OVERHEAD + max(expert_bytes(h, i, "bfloat16") / (GBPS[threads] * 1e9),
                          expert_flops(h, i, tokens) / (GFLOPS[threads] * 1e9))


def _rows() -> list[ExpertRow]:
    return [ExpertRow(hidden=h, intermediate=i, dtype="bfloat16", threads=n, tokens=t, median_s=_time(h, i, t, n),
                      spread=0.0)
            for h, i in SHAPES for n in GBPS for t in (1, 4, 64, 256)]


def test_fit_recovers_the_generating_rates():
    gbps, gflops = fit_expert_rates(_rows(), OVERHEAD)
    assert gbps["bfloat16"] == pytest.approx(GBPS, rel=1e-9)
    assert gflops["bfloat16"] == pytest.approx(GFLOPS, rel=1e-9)


def test_fitted_formula_reproduces_unmeasured_shapes():
    gbps, gflops = fit_expert_rates(_rows(), OVERHEAD)
    p = Profile.from_dict({"version": 1, "name": "fit", "source": "measured", "accelerator": None,
                           "host": {"physical_cores": 2, "memory_bytes": 1 << 30},
                           "cpu": {"memory_read_gbps": {1: 12.0}, "expert_gbps": gbps, "expert_gflops": gflops,
                                   "expert_overhead_s": OVERHEAD}})
    for tokens in (1, 32, 1000):
        assert p.cpu_expert_seconds(2048, 1408, "bfloat16", tokens, 2) == pytest.approx(_time(2048, 1408, tokens, 2))


def test_rows_under_the_overhead_give_no_rate():
    row = ExpertRow(hidden=8, intermediate=8, dtype="float32", threads=1, tokens=1, median_s=1e-6, spread=0.0)
    assert fit_expert_rates([row], OVERHEAD) == ({}, {})


def test_layer_overhead_recovers_the_fixed_cost():
    rows = [DenseRow(hidden=1024, heads=16, kv_heads=8, dtype="bfloat16", threads=2, tokens=1, context=c,
                     median_s=0.0, spread=0.0) for c in (128, 512, 2048)]
    rate = 15.0
    rows = [DenseRow(**{**vars(r), "median_s": 2e-4 + dense_layer_bytes(r, 8) / (rate * 1e9)}) for r in rows]
    prefill = DenseRow(hidden=1024, heads=16, kv_heads=8, dtype="bfloat16", threads=2, tokens=512, context=512,
                       median_s=1.0, spread=0.0)  # prefill rows are not decode steps: ignored
    assert fit_layer_overhead(rows + [prefill], lambda r: rate, lambda r: 8) == pytest.approx(2e-4)
    # q, k, v (1024 x (1024 + 512 + 512)), o (1024 x 1024), 2 norms, router 8 x 1024, KV 2 x 128 x 512; bf16.
    assert dense_layer_bytes(rows[0], 8) == (1024 * 2048 + 1024 * 1024 + 2048 + 8192 + 2 * 128 * 512) * 2
    assert fit_layer_overhead([prefill], lambda r: rate, lambda r: 8) is None


def test_layer_overhead_takes_the_fastest_thread_count_of_each_case():
    base = dict(hidden=256, heads=8, kv_heads=4, dtype="float32", tokens=1, context=128, spread=0.0)
    fast = DenseRow(threads=1, median_s=1e-3, **base)
    contended = DenseRow(threads=2, median_s=5e-2, **base)  # more threads, slower: interference
    expected = 1e-3 - dense_layer_bytes(fast, 8) / 10e9
    assert fit_layer_overhead([fast, contended], lambda r: 10.0, lambda r: 8) == pytest.approx(expected)
