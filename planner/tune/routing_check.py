"""Does a model's routing statistics alone predict what its recorded routing gives? For a model with a
recorded trace: measure the trace's statistics (statistics.trace_stats), draw a synthetic trace calibrated
to them (calibrated.py, nothing else of the trace kept), tune a plan on the synthetic trace (a real Optuna
study), and replay that plan on both traces. What bench/routing_calibration.py reports and the tests check.

Both traces run the same workload shape: the recorded trace's passes in its order, each decode pass of the
synthetic trace taking a recorded decode pass's place after the same prompt's recorded prefill (where the
recorded trace has no prefill, both get one prefill of `prompt_tokens` drawn from their popularity). The decode hit rate (the
one decode speed depends on) and the hit rate over all passes are both reported. Prefetch guesses are no
statistic the synthetic trace keeps: the study and both replays take the accuracy of a trace without guesses
(workload.ASSUMED_PREFETCH_ACCURACY).

Two plans are checked. The tuned one (the study's choice) may keep no cache at all where hits are not worth
their copies (small experts, a small budget): its check is then 0 against 0 and says nothing about the
statistics. So the fastest plan of the same study whose cache fills from the routing as it runs and gets
hits on the synthetic trace is replayed beside it: its hits come from the routing's locality, which is what
the statistics have to predict (a preload alone would hold arbitrary ids: the synthetic labelling is random).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from runtime.contracts.model_shape import ModelShape
from runtime.contracts.traces import Trace

from ..routing.calibrated import Calibration, calibrate
from ..routing.published import recorded_targets
from ..routing.statistics import trace_stats
from ..routing.workload import ASSUMED_PREFETCH_ACCURACY, replay, with_prefill
from .evaluation import Evaluator, cache_capacity
from .study import create_study, run_study

MIN_DECODE_HITS = 0.01  # a caching plan hits in at least 1 % of the tuned-on synthetic trace's decode lookups
MAX_CACHING_REPLAYS = 10  # study plans replayed, fastest first, to find the caching plan


@dataclass(frozen=True)
class PlanHits:
    """One plan's hit rates: predicted (the mean over synthetic draws of the statistics) and recorded."""
    plan: Any
    synthetic_decode_hit_rate: float
    recorded_decode_hit_rate: float
    synthetic_hit_rate: float
    recorded_hit_rate: float

    @property
    def decode_relative_error(self) -> float:
        return relative(self.synthetic_decode_hit_rate, self.recorded_decode_hit_rate)


@dataclass(frozen=True)
class StatisticsOnlyCheck:
    calibration: Calibration
    tuned: PlanHits  # the plan the study chose
    caching: PlanHits | None  # the study's fastest caching plan (module docstring); None: no trial had one


def relative(predicted: float, actual: float) -> float:
    """|predicted - actual| / actual (0 when both are 0, inf when only `actual` is)."""
    if actual == 0:
        return 0.0 if predicted == 0 else float("inf")
    return abs(predicted - actual) / actual


def decode_hit_rate(sim) -> float:
    d = sim.decode
    return d.hits / (d.hits + d.misses) if d.hits + d.misses else 0.0


def statistics_only_check(shape: ModelShape, recorded: Trace, recorded_name: str, profile: Any, *,
                          expert_fraction: float, trials: int, seed: int = 0, context: int = 512,
                          prompt_tokens: int = 128, draws: int = 3) -> StatisticsOnlyCheck:
    """Tune on a synthetic trace calibrated to `recorded`'s statistics; replay the chosen plan and the study's
    fastest caching plan (module docstring) on both."""
    E, k = shape.num_experts, shape.top_k
    targets = recorded_targets(trace_stats(recorded, phases=("decode",)), recorded_name)
    decode_tokens = len(recorded.decode_passes())
    cal = calibrate(targets, None, E, k, decode_tokens, seed, fitted_from=f"statistics of {recorded_name}")
    synthetic, recorded_full = _workload(recorded, cal.trace, prompt_tokens, seed)
    accelerator = "cuda:0"
    fixed = cache_capacity(profile, shape, accelerator, context, prompt_tokens, None).fixed_bytes
    budget = fixed + round(expert_fraction * shape.num_moe_layers * E) * shape.expert_bytes
    capacity = cache_capacity(profile, shape, accelerator, context, prompt_tokens, budget)
    evaluator = Evaluator(profile, shape, synthetic, accelerator=accelerator, context=context,
                          prompt_tokens=prompt_tokens, capacity=capacity, vram_budget=budget,
                          profile_name=getattr(profile, "name", ""))
    study = create_study(None, None, seed, {"model": shape.name, "check": "statistics only"})
    result = run_study(evaluator, study, trials)
    if result.chosen is None:
        raise RuntimeError(f"no feasible plan in {trials} trials")
    # the prediction: a plan's mean over `draws` synthetic traces of the same statistics (the tuned-on one
    # first), so that one draw's random expert labelling does not decide it
    drawn = [synthetic] + [
        _workload(recorded, calibrate(targets, None, E, k, decode_tokens, seed + d,
                                      fitted_from=f"statistics of {recorded_name}").trace, prompt_tokens, seed + d)[0]
        for d in range(1, draws)]

    replays: dict[tuple[int, Any], Any] = {}

    def replayed(draw: int, plan: Any):  # draw -1: the recorded trace; each replay once
        key = (draw, plan)
        if key not in replays:
            trace = recorded_full if draw < 0 else drawn[draw]
            replays[key] = replay(trace, plan, shape, ASSUMED_PREFETCH_ACCURACY)
        return replays[key]

    def hits(plan: Any) -> PlanHits:
        sims = [replayed(d, plan) for d in range(len(drawn))]
        sim_rec = replayed(-1, plan)
        return PlanHits(plan, sum(decode_hit_rate(x) for x in sims) / len(sims), decode_hit_rate(sim_rec),
                        sum(x.hit_rate for x in sims) / len(sims), sim_rec.hit_rate)

    def caches(plan: Any) -> bool:  # fills from the routing and hits on the trace it was tuned on
        return learns_from_routing(plan) and decode_hit_rate(replayed(0, plan)) >= MIN_DECODE_HITS

    tuned = hits(result.chosen.plan)
    if caches(tuned.plan):
        return StatisticsOnlyCheck(cal, tuned, tuned)
    learning = sorted((c for _, c in result.candidates if c.feasible and learns_from_routing(c.plan)),
                      key=lambda c: -c.objective_decode)
    caching = next((c.plan for c in learning[:MAX_CACHING_REPLAYS] if caches(c.plan)), None)  # fastest first
    return StatisticsOnlyCheck(cal, tuned, None if caching is None else hits(caching))


def learns_from_routing(plan: Any) -> bool:
    """A plan whose cache fills from the routing as it runs: slots, and misses that enter them (promoted, or
    copied to the accelerator to be computed there)."""
    return sum(plan.cache.slots) > 0 and (plan.miss.promote or plan.miss.compute != "cpu")


def _workload(recorded: Trace, decode: Trace, prompt_tokens: int, seed: int) -> tuple[Trace, Trace]:
    """(synthetic, recorded) traces of the same workload shape (see the module docstring)."""
    if recorded.prefill_passes():  # the recorded workload's prompts, each followed by synthetic decode tokens
        tokens = iter(decode.passes)
        # the prompts lose their recorded prefetch guesses: the study would otherwise measure a guess accuracy
        # on them that the replays below (accuracy 0) and the statistics do not have
        passes = tuple(replace(p, guesses=None, index=i) if p.phase == "prefill" else replace(next(tokens), index=i)
                       for i, p in enumerate(recorded.passes))
        return Trace(decode.header, passes), recorded
    return with_prefill(decode, prompt_tokens, seed), with_prefill(recorded, prompt_tokens, seed)
