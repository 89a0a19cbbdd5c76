"""A synthetic trace calibrated to a model's routing statistics (published.py), and how far it lands from them.

The trace is drawn by synthetic.py with per-layer parameters fitted to the targets, then measured by the
same function that measures recorded traces (statistics.trace_stats); every target figure is set beside
the synthetic trace's, layer by layer, with the relative error. Pure Python.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from runtime.contracts.traces import Trace

from .published import STATISTICS, LayerTarget, RoutingTargets
from .statistics import trace_stats
from .synthetic import LayerRouting, fit_layer, synthesize_layers

GROUP_STATISTIC = "reuse_by_popularity_q"  # + group index (0: the most popular quarter)


@dataclass(frozen=True)
class FitCheck:
    statistic: str
    layer: int
    target: float
    synthetic: float

    @property
    def relative_error(self) -> float:
        return abs(self.synthetic - self.target) / self.target if self.target else abs(self.synthetic)


@dataclass(frozen=True)
class Calibration:
    targets: RoutingTargets
    trace: Trace
    checks: tuple[FitCheck, ...]

    def worst(self, statistic: str | None = None) -> FitCheck | None:
        pool = [c for c in self.checks if statistic is None or c.statistic == statistic]
        return max(pool, key=lambda c: c.relative_error) if pool else None

    def mean_error(self, statistic: str) -> float | None:
        pool = [c.relative_error for c in self.checks if c.statistic == statistic]
        return sum(pool) / len(pool) if pool else None

    def summary(self) -> str:
        """One line: per statistic fitted, the mean of target and synthetic over layers and the worst layer."""
        parts = []
        for name in STATISTICS:
            pool = [c for c in self.checks if c.statistic == name]
            if not pool:
                continue
            worst = self.worst(name)
            target = sum(c.target for c in pool) / len(pool)
            got = sum(c.synthetic for c in pool) / len(pool)
            parts.append(f"{name} {got:.3f} vs {target:.3f} (worst layer {worst.layer}: "
                         f"{100 * worst.relative_error:.1f}% off)")
        return "synthetic vs targets, mean over layers: " + "; ".join(parts)

    def as_dict(self) -> dict:
        out: dict = {"status": self.targets.status, "sources": dict(self.targets.sources),
                     "published_layers": list(self.targets.published_layers), "statistics": {}}
        for name in STATISTICS:
            pool = [c for c in self.checks if c.statistic == name]
            if pool:
                out["statistics"][name] = {
                    "target": [round(c.target, 4) for c in pool], "synthetic": [round(c.synthetic, 4) for c in pool],
                    "max_relative_error": round(max(c.relative_error for c in pool), 4),
                    "mean_relative_error": round(sum(c.relative_error for c in pool) / len(pool), 4)}
        return out


@lru_cache(maxsize=4096)
def _fit(skew: float, reuse: float, num_experts: int, top_k: int, first: float | None,
         either: float | None, popularity: tuple[float, ...] | None,
         groups: tuple[float | None, ...] | None, second: float | None, exact: bool) -> LayerRouting:
    return fit_layer(skew, reuse, num_experts, top_k, first, either, popularity, groups, second, exact)


def parameters(layers: tuple[LayerTarget, ...], num_experts: int, top_k: int) -> tuple[LayerRouting, ...]:
    return tuple(_fit(round(t.skew, 6), round(t.next_token_reuse, 6), num_experts, top_k,
                      None if t.first_choice_repeat is None else round(t.first_choice_repeat, 6),
                      None if t.first_or_second_repeat is None else round(t.first_or_second_repeat, 6),
                      t.popularity,
                      None if t.reuse_by_popularity is None else
                      tuple(None if g is None else round(g, 6) for g in t.reuse_by_popularity),
                      None if t.second_token_reuse is None else round(t.second_token_reuse, 6),
                      not t.profile_assumed) for t in layers)


def calibrate(targets: RoutingTargets, layers: tuple[LayerTarget, ...] | None, num_experts: int, top_k: int,
              tokens: int, seed: int, fitted_from: str) -> Calibration:
    """A decode trace fitted to `layers` (default: the targets' own), and its distance to them."""
    layers = targets.layers if layers is None else layers
    trace = synthesize_layers(parameters(layers, num_experts, top_k), num_experts, top_k, tokens, seed,
                              fitted_from=fitted_from, model=targets.model)
    return Calibration(targets, trace, compare(layers, trace))


def compare(layers: tuple[LayerTarget, ...], trace: Trace) -> tuple[FitCheck, ...]:
    """Each target figure beside the trace's own, layer by layer (statistics.trace_stats measures both)."""
    stats = trace_stats(trace)
    checks = []
    for t, s in zip(layers, stats.layers):
        for name in STATISTICS:
            want, got = getattr(t, name), getattr(s, name)
            if want is not None and got is not None:
                checks.append(FitCheck(name, s.layer, want, got))
        for g, (want, got) in enumerate(zip(t.reuse_by_popularity or (), s.reuse_by_popularity)):
            if want is not None and got is not None:
                checks.append(FitCheck(f"{GROUP_STATISTIC}{g}", s.layer, want, got))
    return tuple(checks)
