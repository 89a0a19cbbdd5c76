"""Synthetic decode traces whose popularity skew and next-token reuse are fitted to a recorded trace.

The generator, per MoE layer (`E` experts, top-`k`):
- popularity: expert ranks follow a Zipf-like law, weight(rank r) = (r + 1) ** -s, with ranks assigned
  to expert ids by a seeded random permutation per layer;
- temporal reuse: each expert of token t is kept for token t+1 with probability `keep`; the other
  slots are drawn without replacement, by weight, from experts token t did not choose, so the mean
  next-token reuse is exactly `keep` (when E >= 2k).
The exponent `s` is fitted to the sorted popularity through its head: it is the value for which the
generator's top-10% share (statistics.top_share) equals the recorded one, found by bisection on a
seeded calibration run (sampling k without replacement flattens a Zipf law, so the closed form would
miss). To rescale to another model, each target layer takes the source layer at the same relative
depth, and skew and reuse keep their position between uniform routing and their maximum for the new
(E, k): skew between ceil(E/10)/E and min(1, ceil(E/10)/k), reuse between k/E and 1.
"""
from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

from .statistics import top_share, trace_stats
from runtime.contracts.traces import PHASES, Trace, TraceHeader, TracePass

GENERATOR = "moeplan.synthetic/1"
_MAX_EXPONENT = 4.0
_CALIBRATION_TOKENS = 500
_CALIBRATION_SEED = 12345
_BISECTION_STEPS = 10


@dataclass(frozen=True)
class LayerRouting:
    skew: float  # share of selections taken by the top 10% of experts
    reuse: float  # mean next-token reuse (share of a token's experts the previous token also chose)
    zipf_exponent: float  # generator exponent that reproduces `skew` at this shape
    keep: float  # generator probability that an expert of token t is kept at t+1


@dataclass(frozen=True)
class RoutingStats:
    source: str  # name of the trace the statistics were fitted to
    num_layers: int
    num_experts: int
    top_k: int
    layers: tuple[LayerRouting, ...]


def fit_routing_stats(trace: Trace, phases: tuple[str, ...] = PHASES) -> RoutingStats:
    """Measure each layer's skew and next-token reuse, and fit the generator's parameters to them."""
    h = trace.header
    stats = trace_stats(trace, phases=phases)
    layers = tuple(_fit_layer(s.skew, s.next_token_reuse, h.num_experts, h.top_k) for s in stats.layers)
    source = str(h.extra.get("file", h.model))
    return RoutingStats(source, h.num_layers, h.num_experts, h.top_k, layers)


def _fit_layer(skew: float, reuse: float, num_experts: int, top_k: int) -> LayerRouting:
    keep = min(1.0, max(0.0, reuse))
    return LayerRouting(skew, reuse, _fit_exponent(skew, keep, num_experts, top_k), keep)


def _fit_exponent(target_skew: float, keep: float, num_experts: int, top_k: int) -> float:
    def skew_at(s: float) -> float:
        rng = random.Random(_CALIBRATION_SEED)
        rows = _layer_rows(num_experts, top_k, s, keep, _CALIBRATION_TOKENS, rng, list(range(num_experts)))
        counts = [0] * num_experts
        for row in rows:
            for e in row:
                counts[e] += 1
        return top_share(counts)

    lo, hi = 0.0, _MAX_EXPONENT
    if skew_at(lo) >= target_skew:
        return 0.0
    if skew_at(hi) <= target_skew:
        return hi
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if skew_at(mid) < target_skew:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _layer_rows(num_experts: int, top_k: int, exponent: float, keep: float, tokens: int,
                rng: random.Random, ids: list[int]) -> list[tuple[int, ...]]:
    """`tokens` rows of `top_k` distinct expert ids (sorted); rank r is expert ids[r]."""
    cumulative, total = [], 0.0
    for r in range(num_experts):
        total += (r + 1) ** -exponent
        cumulative.append(total)

    def draw(exclude: set[int], n: int) -> list[int]:
        # Weighted sampling without replacement: draw from the whole law and reject excluded ranks;
        # when rejection is slow (heavy head excluded), draw from the explicit remaining weights.
        picked: list[int] = []
        tries = 0
        while len(picked) < n and tries < 16 * top_k:
            tries += 1
            r = min(bisect.bisect_left(cumulative, rng.random() * total), num_experts - 1)
            if r not in exclude:
                exclude.add(r)
                picked.append(r)
        while len(picked) < n:
            rest = [r for r in range(num_experts) if r not in exclude]
            r = rng.choices(rest, weights=[(x + 1) ** -exponent for x in rest])[0]
            exclude.add(r)
            picked.append(r)
        return picked

    rows: list[tuple[int, ...]] = []
    prev: list[int] = []
    for _ in range(tokens):
        kept = [r for r in prev if rng.random() < keep]
        exclude = set(prev)
        if num_experts - len(exclude) < top_k - len(kept):
            exclude = set(kept)  # too few experts outside the previous token's: allow its dropped ones
        prev = kept + draw(exclude, top_k - len(kept))
        rows.append(tuple(sorted(ids[r] for r in prev)))
    return rows


def _position(value: float, low: float, high: float) -> float:
    return 0.0 if high <= low else min(1.0, max(0.0, (value - low) / (high - low)))


def _skew_range(num_experts: int, top_k: int) -> tuple[float, float]:
    head = max(1, math.ceil(0.1 * num_experts - 1e-9))
    return head / num_experts, min(1.0, head / top_k)


def rescale(stats: RoutingStats, num_layers: int, num_experts: int, top_k: int) -> tuple[LayerRouting, ...]:
    """Per target layer, the source layer at the same relative depth, carried over to (E, k)."""
    if num_layers < 1 or num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(f"need num_layers >= 1 and 1 <= top_k <= num_experts, got {num_layers}, "
                         f"{num_experts}, {top_k}")
    same = (num_experts, top_k) == (stats.num_experts, stats.top_k)
    src_lo, src_hi = _skew_range(stats.num_experts, stats.top_k)
    dst_lo, dst_hi = _skew_range(num_experts, top_k)
    out = []
    for l in range(num_layers):
        src = stats.layers[round(l * (stats.num_layers - 1) / (num_layers - 1)) if num_layers > 1 else 0]
        if same:
            out.append(src)
            continue
        skew = dst_lo + _position(src.skew, src_lo, src_hi) * (dst_hi - dst_lo)
        base, new_base = stats.top_k / stats.num_experts, top_k / num_experts
        reuse = new_base + _position(src.reuse, base, 1.0) * (1.0 - new_base)
        out.append(_fit_layer(skew, reuse, num_experts, top_k))
    return tuple(out)


def synthesize(stats: RoutingStats, num_layers: int, num_experts: int, top_k: int, tokens: int,
               seed: int) -> Trace:
    """A decode-only trace of `tokens` passes (one token each) for a model of the given shape."""
    if tokens < 1:
        raise ValueError(f"tokens: must be >= 1, got {tokens}")
    params = rescale(stats, num_layers, num_experts, top_k)
    rng = random.Random(seed)
    per_layer = []
    for p in params:
        ids = list(range(num_experts))
        rng.shuffle(ids)
        per_layer.append(_layer_rows(num_experts, top_k, p.zipf_exponent, p.keep, tokens, rng, ids))
    passes = tuple(TracePass(t, "decode", 1, tuple((per_layer[l][t],) for l in range(num_layers)))
                   for t in range(tokens))
    header = TraceHeader(
        model=f"synthetic-{num_layers}x{num_experts}-top{top_k}", num_layers=num_layers, num_experts=num_experts,
        top_k=top_k, source="synthetic",
        extra={"generator": GENERATOR, "fitted_from": stats.source, "seed": seed, "tokens": tokens,
               "params": [{"skew": round(p.skew, 4), "reuse": round(p.reuse, 4),
                           "zipf_exponent": round(p.zipf_exponent, 4), "keep": round(p.keep, 4)}
                          for p in params]})
    return Trace(header, passes)
