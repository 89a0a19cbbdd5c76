"""Routing statistics per catalog model, each figure with its source, per MoE layer: what synthetic traces
of a model without a recorded trace are calibrated to (synthetic.py), and the spread of locality the
tuner must hold its plan across where the routing is only assumed.

What is published (looked up for every catalog model, December 2026):
- Mixtral-8x7B: Jiang et al. 2024, "Mixtral of Experts", Table 5 ("Percentage of expert assignment
  repetitions"): per Pile subset (8 of them) and layers 0, 15 and 31, the share of consecutive tokens that
  repeat their first choice, and that share an expert among their first and second choices (`MIXTRAL_TABLE5`,
  copied as printed). The paper gives no popularity skew as a number (its Figure 7 is a plot of each
  expert's share by domain, with "no obvious patterns" by topic).
- OLMoE (Muennighoff et al. 2024), Qwen1.5-MoE, DeepSeek-V2(-Lite), Phi-3.5-MoE, Qwen3 and gpt-oss:
  their papers and model cards publish no next-token repetition or reuse figures (OLMoE's routing analysis
  is about router saturation, co-activation and domain / vocabulary specialisation). Liang et al. 2025
  ("Not All Models Suit Expert Offloading", arXiv 2505.16056) compare many MoE models by segment-level
  metrics (SRP, SCH) that do not convert to these statistics; it finds shared experts lower local routing
  consistency. So for these models the statistics are assumed: the recorded OLMoE trace's, at the same
  relative depth and carried to the model's (experts, top-k) by their position between uniform routing and
  the maximum (synthetic.rescale), and the spread to plan across runs from Mixtral's published locality
  (the lower of the two known families) to OLMoE's.

Derived figures, and how: a layer between the published layers 0, 15 and 31 takes the straight line between
its two neighbours (`interpolated` says so); next-token reuse, which Table 5 does not give, is derived from
the first-or-second repetition under the generator's model of independent keeps (top-2: share = 1 - (1 -
reuse)^2, so reuse = 1 - sqrt(1 - share)); Mixtral-8x22B takes Mixtral-8x7B's figures at the same relative
depth (same family, 8 experts, top-2; nothing published for it).
Pure Python.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from runtime.contracts.model_shape import ModelShape

from .statistics import TraceStats, odds

MIXTRAL_SOURCE = ("Jiang et al. 2024, \"Mixtral of Experts\", Table 5 (expert assignment repetitions, "
                  "8 Pile subsets, layers 0, 15, 31)")
MIXTRAL_LAYERS = (0, 15, 31)  # of Mixtral-8x7B's 32 MoE layers
MIXTRAL_MOE_LAYERS = 32
# Pile subset: (first choice at layers 0, 15, 31; first or second choice at layers 0, 15, 31), in percent.
MIXTRAL_TABLE5: dict[str, tuple[float, float, float, float, float, float]] = {
    "ArXiv": (14.0, 27.9, 22.7, 46.5, 62.3, 52.9),
    "DM Mathematics": (14.1, 28.4, 19.7, 44.9, 67.0, 44.5),
    "Github": (14.9, 28.1, 19.7, 49.9, 66.9, 49.2),
    "Gutenberg": (13.9, 26.1, 26.3, 49.5, 63.1, 52.2),
    "PhilPapers": (13.6, 25.3, 22.1, 46.9, 61.9, 51.3),
    "PubMed Abstracts": (14.2, 24.6, 22.0, 48.6, 61.6, 51.8),
    "StackExchange": (13.6, 27.2, 23.6, 48.2, 64.6, 53.6),
    "Wikipedia (en)": (14.4, 23.6, 25.3, 49.8, 62.1, 51.8),
}
MIXTRAL_FAMILY = {"mixtral-8x7b": "published", "mixtral-8x22b": "family"}
STATISTICS = ("skew", "next_token_reuse", "first_choice_repeat", "first_or_second_repeat", "second_token_reuse")


@dataclass(frozen=True)
class LayerTarget:
    """The routing statistics one MoE layer's synthetic trace is fitted to (None: no figure)."""

    skew: float  # share of selections taken by the top 10% of experts
    next_token_reuse: float
    first_choice_repeat: float | None = None
    first_or_second_repeat: float | None = None
    popularity: tuple[float, ...] | None = None  # sorted expert shares (recorded only); None: a Zipf law
    second_token_reuse: float | None = None  # reuse against the token two before; None: what the chain gives
    # reuse_by_popularity and second_token_reuse carried from another model's profile: fitted roughly (no
    # per-layer correction runs, so that layers share calibration runs and `tune` stays fast)
    profile_assumed: bool = False
    # next-token reuse per popularity group, most popular first (statistics.py); None: every expert alike
    reuse_by_popularity: tuple[float | None, ...] | None = None
    interpolated: bool = False  # between published layers, not at one


@dataclass(frozen=True)
class RoutingTargets:
    """A model's per-layer routing statistics and where each came from."""

    model: str
    status: str  # published | family | recorded | assumed
    layers: tuple[LayerTarget, ...]
    sources: dict[str, str]  # statistic -> where its figures came from
    published_layers: tuple[int, ...] = ()  # MoE layers with published figures (the rest interpolated)
    # name -> per-layer targets at the ends of the plausible spread ("low": less locality, "high": more);
    # empty where the routing is recorded (nothing assumed)
    spread: dict[str, tuple[LayerTarget, ...]] = field(default_factory=dict)

    @property
    def assumed(self) -> bool:
        """Routing only assumed: no published figures, or figures for a few layers only."""
        return bool(self.spread)

    def summary(self) -> str:
        return f"{self.model} routing statistics ({self.status}): " + "; ".join(
            f"{k}: {v}" for k, v in self.sources.items())


def uniform_skew(num_experts: int, top_k: int) -> float:
    head = max(1, math.ceil(0.1 * num_experts - 1e-9))
    return head / num_experts


def _position(value: float, low: float, high: float) -> float:
    return 0.0 if high <= low else min(1.0, max(0.0, (value - low) / (high - low)))


def _skew_range(num_experts: int, top_k: int) -> tuple[float, float]:
    head = max(1, math.ceil(0.1 * num_experts - 1e-9))
    return head / num_experts, min(1.0, head / top_k)


def carried(value: float, kind: str, src: tuple[int, int], dst: tuple[int, int]) -> float:
    """A skew or reuse of a model with (experts, top-k) `src` carried to `dst`, keeping its position between
    uniform routing and the maximum (synthetic.rescale's rule)."""
    if kind == "skew":
        (lo, hi), (nlo, nhi) = _skew_range(*src), _skew_range(*dst)
    else:
        (lo, hi), (nlo, nhi) = (src[1] / src[0], 1.0), (dst[1] / dst[0], 1.0)
    return nlo + _position(value, lo, hi) * (nhi - nlo)


def at_depth(values: Sequence[float], layer: int, num_layers: int) -> float:
    """The source layer's value at the same relative depth (nearest, as synthetic.rescale picks)."""
    return values[round(layer * (len(values) - 1) / (num_layers - 1)) if num_layers > 1 else 0]


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """Piecewise-linear through (x, y) points sorted by x, flat beyond the ends."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def mixtral_anchor(column: int, how: str = "mean") -> list[float]:
    """Table 5's column `column` (0-2 first choice, 3-5 first or second) of each layer 0, 15, 31 over the
    domains: mean, min or max, as a fraction. Returned per published layer."""
    out = []
    for j in range(3):
        values = [row[column + j] / 100 for row in MIXTRAL_TABLE5.values()]
        out.append({"mean": sum(values) / len(values), "min": min(values), "max": max(values)}[how])
    return out


def reuse_from_first_or_second(share: float) -> float:
    """Top-2 next-token reuse under independent keeps, from the share of pairs that share an expert."""
    return 1.0 - math.sqrt(max(0.0, 1.0 - share))


def _mixtral_layers(shape: ModelShape, how: str, skews: Sequence[float],
                    profile: LocalityProfile | None = None) -> tuple[LayerTarget, ...]:
    L = shape.num_moe_layers
    first, either = mixtral_anchor(0, how), mixtral_anchor(3, how)
    depth = [a / (MIXTRAL_MOE_LAYERS - 1) for a in MIXTRAL_LAYERS]
    out = []
    for l in range(L):
        x = l / (L - 1) if L > 1 else 0.0
        f = interpolate(list(zip(depth, first)), x)
        a = interpolate(list(zip(depth, either)), x)
        at_anchor = any(abs(x - d) < 1e-9 for d in depth)
        reuse = reuse_from_first_or_second(a)
        extra = {} if profile is None else profile.targets(reuse)
        out.append(LayerTarget(skew=skews[l], next_token_reuse=reuse, first_choice_repeat=f,
                               first_or_second_repeat=a, interpolated=not at_anchor, **extra))
    return tuple(out)


@dataclass(frozen=True)
class LocalityProfile:
    """What one next-token reuse figure leaves open, as a recorded trace shows it, in a form that carries to
    another model: each popularity group's odds of reuse against its layer's next-token reuse
    (reuse_by_popularity), geometric mean over the recorded layers."""

    group_odds_ratio: tuple[float, ...]

    def targets(self, reuse: float) -> dict:
        r = odds(reuse)
        groups = tuple(o * r / (1 + o * r) for o in self.group_odds_ratio)
        # the second-token reuse is not carried: on the recorded OLMoE trace the one-step chain with this
        # profile already lands on it (docs/traces.md), and fitting it per layer would cost `tune` seconds
        return {"reuse_by_popularity": groups or None, "profile_assumed": True}


def locality_profile(stats: TraceStats) -> LocalityProfile:
    """The recorded trace's locality profile (LocalityProfile), from its layers' statistics."""
    logs = [[math.log(odds(g) / odds(s.next_token_reuse)) for g in s.reuse_by_popularity]
            for s in stats.layers if s.reuse_by_popularity and all(g is not None for g in s.reuse_by_popularity)]
    return LocalityProfile(tuple(math.exp(sum(col) / len(col)) for col in zip(*logs)) if logs else ())


def _olmoe_carried(shape: ModelShape, olmoe: TraceStats, kind: str) -> list[float]:
    src = (olmoe.num_experts, olmoe.top_k)
    dst = (shape.num_experts, shape.top_k)
    values = [s.skew if kind == "skew" else s.next_token_reuse for s in olmoe.layers]
    return [carried(at_depth(values, l, shape.num_moe_layers), kind, src, dst) for l in range(shape.num_moe_layers)]


def _mixtral_reuse_position(l: int, num_layers: int) -> float:
    """Mixtral's derived reuse at this relative depth, as a position between uniform (2/8) and 1."""
    x = l / (num_layers - 1) if num_layers > 1 else 0.0
    depth = [a / (MIXTRAL_MOE_LAYERS - 1) for a in MIXTRAL_LAYERS]
    reuse = reuse_from_first_or_second(interpolate(list(zip(depth, mixtral_anchor(3))), x))
    return _position(reuse, 2 / 8, 1.0)


def routing_targets(shape: ModelShape, olmoe: TraceStats, olmoe_file: str) -> RoutingTargets:
    """The routing statistics of a model without a recorded trace: published where they are, else assumed
    (the OLMoE trace's, `olmoe`, read from `olmoe_file`), with the spread to plan across."""
    E, k, L = shape.num_experts, shape.top_k, shape.num_moe_layers
    olmoe_skew = _olmoe_carried(shape, olmoe, "skew")
    uniform = [uniform_skew(E, k)] * L
    skew_source = (f"assumed (no published figure): the recorded {olmoe_file}'s skew at the same relative depth, "
                   f"carried to {E} experts top-{k} by its position between uniform and maximum")
    status = MIXTRAL_FAMILY.get(shape.name)
    if status is not None and (E, k) == (8, 2):
        published = tuple(sorted({round(a * (L - 1) / (MIXTRAL_MOE_LAYERS - 1)) for a in MIXTRAL_LAYERS}))
        where = (f"{MIXTRAL_SOURCE}: mean over the domains at layers 0, 15, 31"
                 + ("" if status == "published" else ", taken at the same relative depth for this model of the "
                    "same family (nothing published for it)")
                 + "; layers between interpolated linearly")
        profile = locality_profile(olmoe)
        profile_source = (f"assumed (no published figure): the recorded {olmoe_file}'s profile (each popularity "
                          f"quarter's odds of reuse against its layer's, geometric mean over its layers), applied "
                          f"to the derived next-token reuse")
        return RoutingTargets(
            model=shape.name, status=status, layers=_mixtral_layers(shape, "mean", olmoe_skew, profile),
            sources={"first_choice_repeat": where, "first_or_second_repeat": where,
                     "next_token_reuse": "derived from first_or_second_repeat assuming independent keeps "
                                         "(reuse = 1 - sqrt(1 - share))",
                     "skew": skew_source,
                     "reuse_by_popularity": profile_source,
                     "spread": "low: the domains' minimum repetitions, uniform popularity and the assumed "
                               "reuse profile; high: their maximum, the assumed skew and no reuse profile (every "
                               "expert kept alike, the one-step chain: more locality a cache can use)"},
            published_layers=published if status == "published" else (),
            spread={"low": _mixtral_layers(shape, "min", uniform, profile),
                    "high": _mixtral_layers(shape, "max", olmoe_skew)})
    olmoe_reuse = _olmoe_carried(shape, olmoe, "reuse")
    base = k / E
    low_reuse = [base + _mixtral_reuse_position(l, L) * (1 - base) for l in range(L)]
    central = tuple(LayerTarget(skew=s, next_token_reuse=r) for s, r in zip(olmoe_skew, olmoe_reuse))
    return RoutingTargets(
        model=shape.name, status="assumed", layers=central,
        sources={"next_token_reuse": f"assumed (nothing published for {shape.name}): the recorded {olmoe_file}'s "
                                     f"at the same relative depth, carried to {E} experts top-{k}",
                 "skew": skew_source,
                 "first_choice_repeat": "not published; no rank preference assumed (1/top_k of kept first choices "
                                        "stay first)",
                 "spread": f"between the known families: low: Mixtral-8x7B's locality ({MIXTRAL_SOURCE}, reuse "
                           f"derived) at the same relative depth and uniform popularity; high: OLMoE's "
                           f"({olmoe_file})"},
        spread={"low": tuple(LayerTarget(skew=u, next_token_reuse=r) for u, r in zip(uniform, low_reuse)),
                "high": central})


def recorded_targets(stats: TraceStats, source: str) -> RoutingTargets:
    """A model's statistics measured on its own recorded trace (nothing assumed, no spread)."""
    layers = tuple(LayerTarget(skew=s.skew, next_token_reuse=s.next_token_reuse,
                               first_choice_repeat=s.first_choice_repeat,
                               first_or_second_repeat=s.first_or_second_repeat, popularity=s.popularity,
                               reuse_by_popularity=s.reuse_by_popularity or None,
                               second_token_reuse=s.second_token_reuse)
                   for s in stats.layers)
    where = f"measured on the recorded trace {source}"
    sources = {name: where for name in ("skew", "next_token_reuse")}
    sources["popularity"] = f"{where}: each layer's sorted expert shares (no ids), the shape the draws follow"
    sources["reuse_by_popularity"] = f"{where}: each layer's next-token reuse per popularity quarter"
    sources["second_token_reuse"] = where
    if stats.mean_first_choice_repeat is not None:
        sources["first_choice_repeat"] = where
    else:
        sources["first_choice_repeat"] = f"not measurable: {source} does not keep the router's rank order"
    return RoutingTargets(model=stats.model, status="recorded", layers=layers, sources=sources)


def with_layers(targets: RoutingTargets, layers: tuple[LayerTarget, ...], status: str) -> RoutingTargets:
    return replace(targets, layers=layers, status=status, spread={})
