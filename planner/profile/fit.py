"""Fitted rates from measured tables: what a profile says about shapes it did not measure.

Pure Python. The model each fit serves (docs/profile.md, "Fitted rates"):

    expert time   = overhead + max(weight_bytes / gbps, flops / gflops)
    dense layer   = layer_overhead + (dense weight bytes + KV bytes) / memory read rate

`gbps` comes from 1-token rows (a decode step reads every weight once and does little arithmetic),
`gflops` from the largest token counts measured (where arithmetic dominates), so that the formula
reproduces the measurement at both ends.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from .records import DTYPE_BYTES, DenseRow, ExpertRow, expert_bytes, expert_flops


def fit_expert_rates(rows: Iterable[ExpertRow], overhead_s: float
                     ) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """(gbps, gflops): dtype -> thread count (or 0 for accelerator rows without threads) -> rate.

    Shapes are pooled by summing bytes (or flops) and time beyond the overhead, so the larger shapes,
    which dominate a model's time, dominate the fit. Rows whose time does not exceed the overhead say
    nothing about a rate and are skipped.
    """
    groups: dict[tuple[str, int], list[ExpertRow]] = {}
    for r in rows:
        groups.setdefault((r.dtype, r.threads or 0), []).append(r)
    gbps: dict[str, dict[int, float]] = {}
    gflops: dict[str, dict[int, float]] = {}
    for (dtype, threads), group in sorted(groups.items()):
        by_shape: dict[tuple[int, int], list[ExpertRow]] = {}
        for r in group:
            by_shape.setdefault((r.hidden, r.intermediate), []).append(r)
        one_token = [min(rs, key=lambda r: r.tokens) for rs in by_shape.values()]
        one_token = [r for r in one_token if r.tokens == 1]
        many = [max(rs, key=lambda r: r.tokens) for rs in by_shape.values()]
        many = [r for r in many if r.tokens > 1]
        rate = _pooled_rate(one_token, overhead_s, lambda r: expert_bytes(r.hidden, r.intermediate, r.dtype))
        if rate is not None:
            gbps.setdefault(dtype, {})[threads] = rate
        rate = _pooled_rate(many, overhead_s, lambda r: expert_flops(r.hidden, r.intermediate, r.tokens))
        if rate is not None:
            gflops.setdefault(dtype, {})[threads] = rate
    return gbps, gflops


def _pooled_rate(rows: list[ExpertRow], overhead_s: float, work: Callable[[ExpertRow], float]) -> float | None:
    """Sum of work / sum of (time - overhead), in units of 1e9 per second; None when no row exceeds the overhead."""
    used = [r for r in rows if r.median_s > overhead_s]
    if not used:
        return None
    return sum(work(r) for r in used) / sum(r.median_s - overhead_s for r in used) / 1e9


def fit_copy_rate(copies: Iterable[tuple[int, float]]) -> float:
    """Host copy rate in GB/s (bytes copied per second, 1e9) from (bytes, seconds) timings of copies: the
    sum of bytes over the sum of times, so the larger copies, which a model's slots are made of, dominate."""
    pairs = list(copies)
    return sum(b for b, _ in pairs) / sum(t for _, t in pairs) / 1e9


def dense_layer_bytes(row: DenseRow, num_experts: int) -> int:
    """Bytes one decode step of a decoder layer reads without its experts: q, k, v, o projections, two
    norms, the router, and the KV cache of `row.context` positions (all in the row's dtype)."""
    head_dim = row.head_dim or row.hidden // row.heads
    q, kv = row.heads * head_dim, row.kv_heads * head_dim
    params = row.hidden * (q + 2 * kv) + q * row.hidden + 2 * row.hidden + num_experts * row.hidden
    kv_values = 2 * row.context * kv
    return (params + kv_values) * DTYPE_BYTES[row.dtype]


def fit_layer_overhead(rows: Iterable[DenseRow], read_gbps: Callable[[DenseRow], float],
                       num_experts: Callable[[DenseRow], int]) -> float | None:
    """Median over decode cases of time minus bytes / read rate, floored at 0; None without decode rows.

    A decode case is one (shape, dtype, context) with tokens == 1; of its rows at several thread counts,
    the fastest counts. The overhead is what the framework costs at best; a thread count that loses to
    fewer threads measures interference (oversubscribed cores), not the layer. `read_gbps(row)` is the
    memory rate that row ran at (DRAM at its thread count, or the accelerator's memory), `num_experts(row)`
    the router width of that row's model."""
    best: dict[tuple, float] = {}
    for r in rows:
        if r.tokens != 1:
            continue
        key = (r.hidden, r.heads, r.kv_heads, r.head_dim, r.dtype, r.context)
        residual = max(0.0, r.median_s - dense_layer_bytes(r, num_experts(r)) / (read_gbps(r) * 1e9))
        best[key] = min(residual, best.get(key, residual))
    residuals = sorted(best.values())
    if not residuals:
        return None
    mid = len(residuals) // 2
    return residuals[mid] if len(residuals) % 2 else (residuals[mid - 1] + residuals[mid]) / 2
