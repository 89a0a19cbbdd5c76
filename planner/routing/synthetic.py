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
  keep * stay_first; stay_first = 1/k is no preference (a shuffled order);
- stickiness by popularity (where the targets give reuse by popularity group, statistics.py): which m of
  token t's experts are kept is drawn by weight, without replacement, the weight of popularity rank r
  being `stickiness[r]` (the kept count m, hence the mean reuse and the first-or-second repetition, is
  unchanged); the first choice then repeats by error diffusion (it stays first whenever it was kept and the
  repeats so far are below the target rate), since which experts are kept no longer decides it at m / k.
  The weights start at each group's odds of reuse against the mean's and are corrected on seeded
  calibration runs (_STICKY_ROUNDS) until the generator's reuse by group lands on the targets;
- recall (where the targets give the second-token reuse, statistics.py, above what the one-step chain
  gives): each expert of token t-1 that token t dropped comes back at t+1, in one of the slots not kept
  from t, with probability `recall` (bisected on calibration runs); the other fresh slots are drawn by
  popularity as before. Where that is not enough (the embedded model's trace repeats its tokens' experts
  two tokens apart), recall above 1 also favours keeping token t's experts that token t-1 chose.
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
from dataclasses import dataclass, replace
from functools import lru_cache

from .statistics import POPULARITY_GROUPS, odds, reuse_by_popularity, top_share, trace_stats
from runtime.contracts.traces import PHASES, Trace, TraceHeader, TracePass

GENERATOR = "moeplan.synthetic/2"
_MAX_EXPONENT = 4.0
_CALIBRATION_TOKENS = 1000
_CALIBRATION_SEED = 12345
_GRID_POINTS = 24  # exponents 0, 1/6, ... 4 measured per shape and keep
_KEEP_STEP = 0.1  # layers whose keep rounds alike share one calibration curve
_STICKY_ROUNDS = 3  # corrections of the stickiness weights on calibration runs
_SHAPE_ROUNDS_AFTER_RECALL = 2  # corrections of a recorded shape once the recall is set
_RECALL_STEPS = 6  # bisection steps fitting the recall to the second-token reuse
_RECALL_KEEP_BOOST = 20.0  # recall 2: an expert of token t-1 is 21 times likelier to be kept, stickiness alike
_RECALL_GRID = 0.05  # an assumed profile's recall, rounded (layers share calibration curves)


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
    # per popularity rank: weight of being among the kept experts (None: every expert alike)
    stickiness: tuple[float, ...] | None = None
    # up to 1: probability that each expert of token t-1 dropped at t comes back at t+1 in a fresh slot;
    # 1 to 2 (with stickiness): every one comes back, and token t's experts that token t-1 also chose are
    # likelier to be kept (weight times 1 + _RECALL_KEEP_BOOST * (recall - 1))
    recall: float = 0.0

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
              popularity: tuple[float, ...] | None = None,
              reuse_groups: tuple[float | None, ...] | None = None,
              second_reuse: float | None = None, exact: bool = True) -> LayerRouting:
    """The generator's parameters for one layer's targets (first_choice None: no rank preference;
    popularity None: a Zipf law, else weights shaped like these sorted shares, sharpened or flattened by
    the fitted exponent until the top-10% share is `skew`; reuse_groups: reuse by popularity group, most
    popular first, or None: every expert kept alike; second_reuse: reuse against the token two before, or
    None: what the one-step chain gives; exact False: the stickiness weights are the groups' odds ratios
    uncorrected and the recall is rounded to _RECALL_GRID, so that layers of an assumed profile share their
    calibration runs)."""
    keep = min(1.0, max(0.0, reuse))
    stay = None
    if first_choice is not None:
        stay = min(1.0, max(0.0, first_choice / keep)) if keep > 0 else 0.0
    if popularity is not None:
        # a floor so that an expert never seen in the recording stays possible
        floor = 0.5 / max(1, len(popularity)) * min((p for p in popularity if p > 0), default=1.0)
        popularity = tuple(max(p, floor) for p in popularity)
    either = first_or_second if top_k == 2 else None
    base = LayerRouting(skew, reuse, 0.0, keep, first_choice, stay, either, popularity)
    if keep <= 0 or keep >= 1:
        return replace(base, zipf_exponent=_fit_exponent(skew, keep, num_experts, top_k, popularity))
    weights = None
    if reuse_groups and any(g is not None for g in reuse_groups):
        weights = _group_weights([odds(g) / odds(keep) if g is not None else 1.0 for g in reuse_groups],
                                 num_experts)
        if exact and popularity is not None:
            return _fit_shape(base, reuse_groups, weights, second_reuse, num_experts, top_k)
        if exact:
            exponent = _fit_exponent(skew, keep, num_experts, top_k, popularity, weights)
            for _ in range(_STICKY_ROUNDS):
                rows = _calibration_rows(replace(base, zipf_exponent=exponent, stickiness=weights), num_experts,
                                         top_k)
                got = reuse_by_popularity([rows], _counts(rows, num_experts), POPULARITY_GROUPS)
                weights = _corrected(weights, reuse_groups, got, num_experts)
    exponent = _fit_exponent(skew, keep, num_experts, top_k, popularity, weights)
    fitted = replace(base, zipf_exponent=exponent, stickiness=weights)
    if second_reuse is None or _second_reuse(fitted, num_experts, top_k) >= second_reuse:
        return fitted
    recall = _fit_recall(fitted, second_reuse, num_experts, top_k)
    if not exact:
        recall = round(recall / _RECALL_GRID) * _RECALL_GRID
    return replace(fitted, recall=recall,
                   zipf_exponent=_fit_exponent(skew, keep, num_experts, top_k, popularity, weights, recall))


def _fit_recall(p: LayerRouting, second_reuse: float, num_experts: int, top_k: int) -> float:
    """The recall whose calibration run reaches `second_reuse` (bisected: the reuse grows with it)."""
    lo, hi = 0.0, 2.0 if p.stickiness is not None else 1.0
    for _ in range(_RECALL_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _second_reuse(replace(p, recall=mid), num_experts, top_k) < second_reuse else (lo, mid)
    return (lo + hi) / 2


def _corrected(weights: tuple[float, ...], want: tuple[float | None, ...], got: tuple[float | None, ...],
               num_experts: int) -> tuple[float, ...]:
    """Stickiness weights times each group's odds of reuse wanted against those of the calibration run."""
    ratios = [1.0 if w is None or h is None else odds(w) / odds(h) for w, h in zip(want, got)]
    return tuple(x * r for x, r in zip(weights, _group_weights(ratios, num_experts)))


def _fit_shape(base: LayerRouting, reuse_groups: tuple[float | None, ...], weights: tuple[float, ...],
               second_reuse: float | None, num_experts: int, top_k: int) -> LayerRouting:
    """A recorded layer's whole popularity shape, not only its top-10% share: with stickiness the experts
    kept longer are drawn more often than their weight says, so both the draw weights per rank (exponent 1)
    and the stickiness are corrected on calibration runs, rank by rank and group by group, before and after
    the recall is fitted to the second-token reuse."""
    assert base.popularity is not None
    target = [x / sum(base.popularity) for x in base.popularity]
    p = replace(base, zipf_exponent=1.0, stickiness=weights)

    def rounds(p: LayerRouting, n: int) -> LayerRouting:
        for _ in range(n):
            rows = _calibration_rows(p, num_experts, top_k)
            counts = _counts(rows, num_experts)  # ids are popularity ranks in a calibration run
            total = sum(counts)
            shape = tuple(w * min(4.0, max(0.25, t / max(c / total, 0.25 / total)))
                          for w, t, c in zip(p.popularity, target, counts))
            got = reuse_by_popularity([rows], counts, POPULARITY_GROUPS)
            p = replace(p, popularity=shape, stickiness=_corrected(p.stickiness, reuse_groups, got, num_experts))
        return p

    p = rounds(p, _STICKY_ROUNDS)
    if second_reuse is not None and _second_reuse(p, num_experts, top_k) < second_reuse:
        p = rounds(replace(p, recall=_fit_recall(p, second_reuse, num_experts, top_k)), _SHAPE_ROUNDS_AFTER_RECALL)
    return p


def _counts(rows: list[tuple[int, ...]], num_experts: int) -> list[int]:
    counts = [0] * num_experts
    for row in rows:
        for e in row:
            counts[e] += 1
    return counts


def _second_reuse(p: LayerRouting, num_experts: int, top_k: int) -> float:
    rows = _calibration_rows(p, num_experts, top_k)
    return sum(len(set(a) & set(b)) for a, b in zip(rows, rows[2:])) / (top_k * max(1, len(rows) - 2))


def _group_weights(per_group: list[float], num_experts: int) -> tuple[float, ...]:
    """Per popularity rank, its group's weight (ranks cut into len(per_group) equal groups, as statistics.py)."""
    return tuple(per_group[r * len(per_group) // num_experts] for r in range(num_experts))


def _calibration_rows(p: LayerRouting, num_experts: int, top_k: int) -> list[tuple[int, ...]]:
    """A seeded calibration run of `p` (ids = popularity ranks)."""
    return _routing_rows(p, num_experts, top_k, _CALIBRATION_TOKENS, random.Random(_CALIBRATION_SEED),
                         list(range(num_experts)))


def _routing_rows(p: LayerRouting, num_experts: int, top_k: int, tokens: int, rng: random.Random,
                  ids: list[int]) -> list[tuple[int, ...]]:
    """`tokens` rows drawn with `p` (`_layer_rows`), expert id `ids[rank]` for each popularity rank."""
    return _layer_rows(num_experts, top_k, p.zipf_exponent, p.keep, tokens, rng, ids, p.stay_first,
                       p.kept_distribution(top_k), p.popularity, p.stickiness, p.first_choice, p.recall)


def _fit_exponent(target_skew: float, keep: float, num_experts: int, top_k: int,
                  popularity: tuple[float, ...] | None = None, stickiness: tuple[float, ...] | None = None,
                  recall: float = 0.0) -> float:
    """The exponent whose calibration run gives `target_skew`: interpolated on the generator's skew over a
    grid of exponents, measured once per shape and `keep` rounded to _KEEP_STEP (layers share it)."""
    bucket = round(round(keep / _KEEP_STEP) * _KEEP_STEP, 6)
    curve = _skew_curve(num_experts, top_k, bucket, popularity,
                        None if stickiness is None else tuple(round(w, 4) for w in stickiness), round(recall, 4))
    if target_skew <= curve[0][1]:
        return 0.0
    for (s0, k0), (s1, k1) in zip(curve, curve[1:]):
        if target_skew <= k1:
            return s0 + (s1 - s0) * (target_skew - k0) / (k1 - k0) if k1 > k0 else s1
    return curve[-1][0]


@lru_cache(maxsize=256)
def _skew_curve(num_experts: int, top_k: int, keep: float, popularity: tuple[float, ...] | None = None,
                stickiness: tuple[float, ...] | None = None, recall: float = 0.0) -> tuple[tuple[float, float], ...]:
    """(exponent, top-10% share of a seeded calibration run) on a grid, made non-decreasing (sampling noise)."""
    out: list[tuple[float, float]] = []
    best = 0.0
    for i in range(_GRID_POINTS + 1):
        s = _MAX_EXPONENT * i / _GRID_POINTS
        rng = random.Random(_CALIBRATION_SEED)
        rows = _layer_rows(num_experts, top_k, s, keep, _CALIBRATION_TOKENS, rng, list(range(num_experts)),
                           popularity=popularity, stickiness=stickiness, recall=recall)
        best = max(best, top_share(_counts(rows, num_experts)))
        out.append((s, best))
    return tuple(out)


def _layer_rows(num_experts: int, top_k: int, exponent: float, keep: float, tokens: int,
                rng: random.Random, ids: list[int], stay_first: float | None = None,
                kept: list[float] | None = None,
                popularity: tuple[float, ...] | None = None, stickiness: tuple[float, ...] | None = None,
                first_choice: float | None = None, recall: float = 0.0) -> list[tuple[int, ...]]:
    """`tokens` rows of `top_k` distinct expert ids in rank order; popularity rank r is expert ids[r]
    (`stickiness`: the kept experts drawn by these weights per rank, the first choice repeating at the rate
    `first_choice`, or 1 / top_k of kept first choices where it is None)."""
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
    before: list[int] = []  # token t-1's experts, for the recall
    repeats = 0
    for t, (m, first_kept, stays) in enumerate(outcomes):
        if not prev:
            order = draw(set(), top_k)
        else:
            others = prev[1:]
            if stickiness is not None:
                keep_weights = stickiness
                if recall > 1:  # beyond every dropped expert coming back: keep the ones token t-1 also chose
                    boost = 1 + _RECALL_KEEP_BOOST * (recall - 1)
                    keep_weights = {r: stickiness[r] * (boost if r in before else 1.0) for r in prev}
                held = _weighted_sample(prev, m, keep_weights, rng)
                if first_choice is not None and held and prev[0] not in held and repeats < first_choice * t:
                    held[-1] = prev[0]  # behind the first-choice rate: the first choice takes the last kept place
                first_kept = prev[0] in held
                if first_choice is None:
                    stays = rng.random() < 1.0 / top_k
                else:  # error diffusion: repeat whenever the repeats so far fall short of the target rate
                    stays = first_kept and repeats < first_choice * t
                repeats += first_kept and stays
            else:
                held = ([prev[0]] + rng.sample(others, m - 1)) if first_kept else rng.sample(others, min(m, len(others)))
            exclude = set(prev)
            if num_experts - len(exclude) < top_k - len(held):
                exclude = set(held)  # too few experts outside the previous token's: allow its dropped ones
            fresh: list[int] = []
            if recall > 0:  # the previous token's dropped experts come back, each with probability `recall`
                back = [r for r in before if r not in exclude]
                rng.shuffle(back)
                for r in back:
                    if len(fresh) < top_k - len(held) and rng.random() < recall:
                        fresh.append(r)
                        exclude.add(r)
            rest = [r for r in held if r != prev[0]] + fresh + draw(exclude, top_k - len(held) - len(fresh))
            rng.shuffle(rest)
            if first_kept and stays:
                order = [prev[0]] + rest
            elif first_kept:
                rest.insert(rng.randrange(1, top_k), prev[0])
                order = rest
            else:
                order = rest
        before, prev = prev, order
        rows.append(tuple(ids[r] for r in order))
    return rows


def _weighted_sample(items: list[int], n: int, weights, rng: random.Random) -> list[int]:
    """`n` of `items` (popularity ranks) without replacement, each pick by weights[item] among those left."""
    pool, picked = list(items), []
    for _ in range(min(n, len(pool))):
        total = sum(weights[r] for r in pool)
        u, acc = rng.random() * total, 0.0
        for i, r in enumerate(pool):
            acc += weights[r]
            if u <= acc:
                break
        picked.append(pool.pop(i))
    return picked


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
        per_layer.append(_routing_rows(p, num_experts, top_k, tokens, rng, ids))
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
                           **({} if p.popularity is None else {"popularity": [round(x, 5) for x in p.popularity]}),
                           **({} if p.stickiness is None else {"stickiness": [round(x, 4) for x in p.stickiness]}),
                           **({} if not p.recall else {"recall": round(p.recall, 4)})}
                          for p in params]})
    return Trace(header, passes)
