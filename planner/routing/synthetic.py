"""Synthetic decode traces calibrated per layer to routing statistics: popularity skew, next-token reuse and
first-choice repetition (statistics.py measures all three, on recorded and synthetic traces alike).

The generator, per MoE layer (`E` experts, top-`k`), keeps the router's rank order (first choice first):
- popularity: expert ranks follow a Zipf-like law, weight(rank r) = (r + 1) ** -s, with ranks assigned
  to expert ids by a seeded random permutation per layer;
- temporal reuse: token t+1 keeps m of token t's k experts, m ~ Binomial(k, keep) (each expert kept
  independently with probability `keep`, which experts uniformly); the other slots are drawn without
  replacement, by weight, from experts token t did not choose. So the mean next-token reuse is `keep`, and
  for top-2 the share of pairs that share an expert (the Mixtral paper's "first or second choice"
  repetition) is 1 - (1 - keep)^2;
- rank order: when token t's first choice is kept, it is token t+1's first choice with probability
  `stay_first` (else it takes one of the other ranks, uniformly), so the first-choice repetition is
  keep * stay_first; stay_first = 1/k is no preference (a shuffled order).
The outcome of each token (m, first choice kept or not, first again or not) is drawn by stratified sampling
(one seeded uniform per token from each of `tokens` equal strata, shuffled), so that a trace of a few hundred
tokens already lands within a few percent of the rates it was fitted to; the expert ids are drawn freely.
The exponent `s` is fitted to the sorted popularity through its head: it is the value for which the
generator's top-10% share (statistics.top_share) equals the target, interpolated on seeded calibration runs
over a grid of exponents (sampling k without replacement flattens a Zipf law, so the closed form would
miss); layers of one shape whose keep probabilities round alike share the runs.
To rescale recorded statistics to another model (`rescale`), each target layer takes the source layer at
the same relative depth, and skew and reuse keep their position between uniform routing and their maximum
for the new (E, k): skew between ceil(E/10)/E and min(1, ceil(E/10)/k), reuse between k/E and 1.
"""
from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass
from functools import lru_cache

from .statistics import top_share, trace_stats
from runtime.contracts.traces import PHASES, Trace, TraceHeader, TracePass

GENERATOR = "moeplan.synthetic/2"
_MAX_EXPONENT = 4.0
_CALIBRATION_TOKENS = 1000
_CALIBRATION_SEED = 12345
_GRID_POINTS = 24  # exponents 0, 1/6, ... 4 measured per shape and keep
_KEEP_STEP = 0.1  # layers whose keep rounds alike share one calibration curve


@dataclass(frozen=True)
class LayerRouting:
    skew: float  # share of selections taken by the top 10% of experts
    reuse: float  # mean next-token reuse (share of a token's experts the previous token also chose)
    zipf_exponent: float  # generator exponent that reproduces `skew` at this shape
    keep: float  # generator probability that an expert of token t is kept at t+1
    first_choice: float | None = None  # target first-choice repetition (None: no target)
    stay_first: float | None = None  # probability a kept first choice stays first (None: 1/k, no preference)
    first_or_second: float | None = None  # top-2 only: target share of pairs sharing an expert (None: binomial)
    # sorted popularity shares to draw by (weight of rank r: popularity[r] ** zipf_exponent); None: the Zipf law
    popularity: tuple[float, ...] | None = None

    def kept_distribution(self, top_k: int) -> list[float]:
        """P(m experts of the previous token kept), m = 0..k: Binomial(k, keep), or for top-2 with a
        first-or-second target a, the one distribution with mean 2 * keep and P(m >= 1) = a."""
        a, r = self.first_or_second, self.keep
        if top_k == 2 and a is not None and 0 <= 2 * r - a <= 1 and 2 * a - 2 * r >= 0 and a <= 1:
            return [1 - a, 2 * a - 2 * r, 2 * r - a]
        return [math.comb(top_k, m) * r ** m * (1 - r) ** (top_k - m) for m in range(top_k + 1)]


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
    layers = tuple(fit_layer(s.skew, s.next_token_reuse, h.num_experts, h.top_k, s.first_choice_repeat)
                   for s in stats.layers)
    source = str(h.extra.get("file", h.model))
    return RoutingStats(source, h.num_layers, h.num_experts, h.top_k, layers)


def fit_layer(skew: float, reuse: float, num_experts: int, top_k: int,
              first_choice: float | None = None, first_or_second: float | None = None,
              popularity: tuple[float, ...] | None = None) -> LayerRouting:
    """The generator's parameters for one layer's targets (first_choice None: no rank preference;
    popularity None: a Zipf law, else weights shaped like these sorted shares, sharpened or flattened by
    the fitted exponent until the top-10% share is `skew`)."""
    keep = min(1.0, max(0.0, reuse))
    stay = None
    if first_choice is not None:
        stay = min(1.0, max(0.0, first_choice / keep)) if keep > 0 else 0.0
    if popularity is not None:
        # a floor so that an expert never seen in the recording stays possible
        floor = 0.5 / max(1, len(popularity)) * min((p for p in popularity if p > 0), default=1.0)
        popularity = tuple(max(p, floor) for p in popularity)
    return LayerRouting(skew, reuse, _fit_exponent(skew, keep, num_experts, top_k, popularity), keep, first_choice,
                        stay, first_or_second if top_k == 2 else None, popularity)


def _fit_exponent(target_skew: float, keep: float, num_experts: int, top_k: int,
                  popularity: tuple[float, ...] | None = None) -> float:
    """The exponent whose calibration run gives `target_skew`: interpolated on the generator's skew over a
    grid of exponents, measured once per shape and `keep` rounded to _KEEP_STEP (layers share it)."""
    bucket = round(round(keep / _KEEP_STEP) * _KEEP_STEP, 6)
    curve = _skew_curve(num_experts, top_k, bucket, popularity)
    if target_skew <= curve[0][1]:
        return 0.0
    for (s0, k0), (s1, k1) in zip(curve, curve[1:]):
        if target_skew <= k1:
            return s0 + (s1 - s0) * (target_skew - k0) / (k1 - k0) if k1 > k0 else s1
    return curve[-1][0]


@lru_cache(maxsize=256)
def _skew_curve(num_experts: int, top_k: int, keep: float,
                popularity: tuple[float, ...] | None = None) -> tuple[tuple[float, float], ...]:
    """(exponent, top-10% share of a seeded calibration run) on a grid, made non-decreasing (sampling noise)."""
    out: list[tuple[float, float]] = []
    best = 0.0
    for i in range(_GRID_POINTS + 1):
        s = _MAX_EXPONENT * i / _GRID_POINTS
        rng = random.Random(_CALIBRATION_SEED)
        rows = _layer_rows(num_experts, top_k, s, keep, _CALIBRATION_TOKENS, rng, list(range(num_experts)),
                           popularity=popularity)
        counts = [0] * num_experts
        for row in rows:
            for e in row:
                counts[e] += 1
        best = max(best, top_share(counts))
        out.append((s, best))
    return tuple(out)


def _layer_rows(num_experts: int, top_k: int, exponent: float, keep: float, tokens: int,
                rng: random.Random, ids: list[int], stay_first: float | None = None,
                kept: list[float] | None = None,
                popularity: tuple[float, ...] | None = None) -> list[tuple[int, ...]]:
    """`tokens` rows of `top_k` distinct expert ids in rank order; popularity rank r is expert ids[r]."""
    weights = [(r + 1) ** -exponent if popularity is None else popularity[r] ** exponent for r in range(num_experts)]
    cumulative, total = [], 0.0
    for r in range(num_experts):
        total += weights[r]
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
            r = rng.choices(rest, weights=[weights[x] for x in rest])[0]
            exclude.add(r)
            picked.append(r)
        return picked

    if kept is None:
        kept = LayerRouting(0.0, keep, 0.0, keep).kept_distribution(top_k)
    outcomes = _stratified_outcomes(top_k, kept, 1.0 / top_k if stay_first is None else stay_first, tokens, rng)
    rows: list[tuple[int, ...]] = []
    prev: list[int] = []
    for m, first_kept, stays in outcomes:
        if not prev:
            order = draw(set(), top_k)
        else:
            others = prev[1:]
            held = ([prev[0]] + rng.sample(others, m - 1)) if first_kept else rng.sample(others, min(m, len(others)))
            exclude = set(prev)
            if num_experts - len(exclude) < top_k - len(held):
                exclude = set(held)  # too few experts outside the previous token's: allow its dropped ones
            rest = [r for r in held if r != prev[0]] + draw(exclude, top_k - len(held))
            rng.shuffle(rest)
            if first_kept and stays:
                order = [prev[0]] + rest
            elif first_kept:
                rest.insert(rng.randrange(1, top_k), prev[0])
                order = rest
            else:
                order = rest
        prev = order
        rows.append(tuple(ids[r] for r in order))
    return rows


def _stratified_outcomes(top_k: int, kept: list[float], stay_first: float, tokens: int,
                         rng: random.Random) -> list[tuple[int, bool, bool]]:
    """Per token: (experts kept from the previous token, whether its first choice is among them, whether it
    stays first), with the model's probabilities, drawn by stratified sampling (counts within one of the
    expectation per outcome)."""
    table: list[tuple[float, tuple[int, bool, bool]]] = []
    for m in range(top_k + 1):
        pm = kept[m]
        pf = m / top_k
        for first_kept, p1 in ((True, pf), (False, 1 - pf)):
            for stays, p2 in ((True, stay_first), (False, 1 - stay_first)):
                p = pm * p1 * (p2 if first_kept else (1.0 if not stays else 0.0))
                if p > 0:
                    table.append((p, (m, first_kept, stays and first_kept)))
    cumulative, total = [], 0.0
    for p, _ in table:
        total += p
        cumulative.append(total)
    strata = list(range(tokens))
    rng.shuffle(strata)
    out = []
    for s in strata:
        u = (s + rng.random()) / tokens * total
        out.append(table[min(bisect.bisect_left(cumulative, u), len(table) - 1)][1])
    return out


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
        out.append(fit_layer(skew, reuse, num_experts, top_k))
    return tuple(out)


def synthesize(stats: RoutingStats, num_layers: int, num_experts: int, top_k: int, tokens: int,
               seed: int) -> Trace:
    """A decode-only trace of `tokens` passes (one token each) for a model of the given shape, fitted to
    `stats` rescaled to that shape."""
    return synthesize_layers(rescale(stats, num_layers, num_experts, top_k), num_experts, top_k, tokens, seed,
                             fitted_from=stats.source)


def synthesize_layers(params: tuple[LayerRouting, ...], num_experts: int, top_k: int, tokens: int, seed: int,
                      fitted_from: str, model: str | None = None) -> Trace:
    """A decode-only trace of `tokens` passes, one token each, layer l drawn with `params[l]`."""
    if tokens < 1:
        raise ValueError(f"tokens: must be >= 1, got {tokens}")
    num_layers = len(params)
    rng = random.Random(seed)
    per_layer = []
    for p in params:
        ids = list(range(num_experts))
        rng.shuffle(ids)
        per_layer.append(_layer_rows(num_experts, top_k, p.zipf_exponent, p.keep, tokens, rng, ids, p.stay_first,
                                     p.kept_distribution(top_k), p.popularity))
    passes = tuple(TracePass(t, "decode", 1, tuple((per_layer[l][t],) for l in range(num_layers)))
                   for t in range(tokens))
    header = TraceHeader(
        model=model or f"synthetic-{num_layers}x{num_experts}-top{top_k}", num_layers=num_layers,
        num_experts=num_experts, top_k=top_k, source="synthetic",
        extra={"generator": GENERATOR, "rank_order": True, "fitted_from": fitted_from, "seed": seed,
               "tokens": tokens,
               "params": [{"skew": round(p.skew, 4), "reuse": round(p.reuse, 4),
                           "zipf_exponent": round(p.zipf_exponent, 4), "keep": round(p.keep, 4),
                           **({} if p.stay_first is None else {"stay_first": round(p.stay_first, 4)}),
                           **({} if p.first_or_second is None else {"first_or_second": round(p.first_or_second, 4)}),
                           **({} if p.popularity is None else {"popularity": [round(x, 5) for x in p.popularity]})}
                          for p in params]})
    return Trace(header, passes)
