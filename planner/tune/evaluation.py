"""One point of the tuner's search space (space.py), turned into a plan and predicted: the objective `tune` calls.

A `Choice` is what the search picks (cache budget in slots, policy, preload, CPU threads, miss rule,
prefetch). `Evaluator.evaluate` splits the budget across layers exactly (`planner.tune.allocation`) from
per-layer hit curves, writes the plan, replays the trace through the simulator and asks the cost model.
Pure Python, no torch; curves and replays are memoised, so a study of hundreds of trials replays each
distinct configuration once.

Hit curves, per layer, hits for every slot count 0..E over the whole replayed trace (prefill and
decode passes, which is what the cost model adds up):
- static: the sum of the s most used experts' pass counts (exact: what a static cache of the
  `popular_preload` experts hits);
- lru with no preload where every miss enters the cache: `lru_hit_curves` (exact, one sweep);
- every other policy, preload and miss rule: one `simulate` per slot count with that many slots in
  every layer (exact, since layers are independent without prefetch). With `lookahead: 1` the curves
  ignore prefetch (the final replay does not): the split is then optimal for the cache without prefetch.

Assumed routing (a synthetic trace whose statistics are not all published, routing.workload.Workload
.scenarios): every plan, made on the central trace, is also predicted on the traces at the ends of the
plausible spread of locality, and the search maximises the worst of these decode speeds
(`Candidate.objective_decode`). The worst case rather than a mean or a quantile: the spread's ends are
the ends of what is plausible (the known families, the published domains), not samples of a distribution
with weights, so a plan should be judged by what it keeps at the less favourable end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.contracts.cache_policy import MissRule
from runtime.contracts.expert_format import FORMATS
from runtime.contracts.model_shape import ModelShape
from runtime.contracts.traces import Trace
from runtime.errors import UserError
from runtime.plan import CacheSpec, HardwareSpec, MissSpec, ModelSpec, Plan, PrefetchSpec

from ..cost_model import Prediction, memory_plan, predict
from ..routing.simulator import SimResult, lru_hit_curves, popular_preload, simulate
from ..routing.workload import prefetch_accuracy
from .allocation import Allocation, allocate
from .space import Choice, Space

# why a CPU plan gets no cache slot (cache_capacity), as the tuner's log and report say it
NO_SLOTS_ON_CPU = "without an accelerator a slot would be a second copy in host memory, computed as a miss is"


class InfeasibleBudget(UserError):
    """Not even the plan without any expert slot fits the memory it is given."""


def plan_experts(shape: ModelShape) -> str | None:
    """The plan's `model.experts` for `shape`: its expert format where the plan must name it (stored other
    than the dtype, in a format a plan can say), else None (the key is left out)."""
    fmt = shape.expert_format
    return fmt if fmt != shape.dtype and fmt in FORMATS else None


# ---- memory: how many slots fit ---------------------------------------------------------------------
@dataclass(frozen=True)
class Capacity:
    """Where expert slots live and how many fit there."""

    device: str  # "accelerator", or "host" for accelerator: cpu plans
    limit_bytes: int  # what the device (or --vram-budget) allows for the cache's side
    fixed_bytes: int  # what that side needs with zero slots (dense weights, KV cache, workspace)
    expert_bytes: int
    max_slots: int  # min(layers x experts, what fits)


def cache_capacity(profile: Any, shape: ModelShape, accelerator: str, context: int, prompt_tokens: int,
                   vram_budget: int | None) -> Capacity:
    """Slots that fit beside the dense weights, KV cache and workspace; `InfeasibleBudget` if none can.

    On a GPU plan the limit is `vram_budget` or the profile's accelerator memory; the host must also
    hold every expert. On a CPU plan (`accelerator: cpu`) the host must hold the model and, when
    `vram_budget` is given, that budget must hold dense + KV + workspace (the part that would sit on an
    accelerator); no slot is offered there. A slot on the CPU is a second copy of an expert in the same
    host memory, computed by the same kernel as a miss (so the cost model cannot tell a hit from a miss)
    and it takes the runtime off its shorter no-cache path (bench/results/tiny_plan_slots_ab.md: the
    embedded model's plan with 2 slots decoded at a median of 174 tokens/s, without at 185). Left open,
    the search picked slots on ties the prefill's averaging broke.
    """
    L, E = shape.num_moe_layers, shape.num_experts
    empty = Plan(model=ModelSpec(name=shape.name, dtype=shape.dtype, experts=plan_experts(shape)), hardware=HardwareSpec(accelerator=accelerator),
                 cache=CacheSpec(slots=0))
    items, limits = memory_plan(profile, shape, empty, context, prompt_tokens, vram_budget)
    eb = shape.expert_bytes
    host_need = sum(items["host"].values())
    if accelerator != "cpu":
        fixed, limit = sum(items["accelerator"].values()), limits["accelerator"]
        if fixed > limit:
            raise InfeasibleBudget(_no_fit("accelerator memory", fixed, limit, items["accelerator"]))
        if host_need > limits["host"]:
            raise InfeasibleBudget(_no_fit("host memory", host_need, limits["host"], items["host"]))
        return Capacity("accelerator", limit, fixed, eb, min(L * E, (limit - fixed) // eb))
    if host_need > limits["host"]:
        raise InfeasibleBudget(_no_fit("host memory", host_need, limits["host"], items["host"]))
    limit, fixed = limits["host"], host_need
    if vram_budget is not None:
        side = {k: v for k, v in items["host"].items() if k != "experts"}
        fixed, limit = sum(side.values()), vram_budget
        if fixed > limit:
            raise InfeasibleBudget(_no_fit("--vram-budget", fixed, limit, side))
    return Capacity("host", limit, fixed, eb, 0)


def _no_fit(what: str, need: int, have: int, items: dict[str, int]) -> str:
    parts = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in items.items() if v)
    return (f"{what}: the plan needs {need / 2**30:.2f} GiB ({need} bytes) before any expert slot "
            f"({parts}) but has {have / 2**30:.2f} GiB ({have} bytes)")


# ---- evaluating one choice ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """A choice, the plan it became, and what the cost model predicts for it."""

    choice: Choice
    plan: Plan
    prediction: Prediction
    feasible: bool  # fits every device's memory (and the cache budget)
    excess_bytes: int  # largest overshoot of a memory limit (<= 0 when feasible): the Optuna constraint
    # decode tokens/s predicted on each spread scenario's trace ("low", "high"); empty: routing not assumed
    spread_decode: tuple[tuple[str, float], ...] = ()

    @property
    def decode_tokens_per_s(self) -> float:
        return self.prediction.decode_tokens_per_s

    @property
    def decode_range(self) -> tuple[float, float]:
        """Lowest and highest predicted decode tokens/s over the central trace and the spread."""
        values = [self.decode_tokens_per_s, *(v for _, v in self.spread_decode)]
        return min(values), max(values)

    @property
    def objective_decode(self) -> float:
        """What the search maximises: the worst case over the spread (the central prediction without one)."""
        return self.decode_range[0]

    @property
    def prefill_s(self) -> float:
        return self.prediction.prefill.total_s


class Evaluator:
    """Turns choices into predicted plans for one (profile, model, trace, workload, memory limit)."""

    def __init__(self, profile: Any, shape: ModelShape, trace: Trace, *, accelerator: str, context: int,
                 prompt_tokens: int, capacity: Capacity, vram_budget: int | None = None,
                 model_path: str | None = None, profile_name: str = "",
                 scenarios: dict[str, Trace] | None = None) -> None:
        self.profile, self.shape, self.trace = profile, shape, trace
        self.accelerator, self.context, self.prompt_tokens = accelerator, context, prompt_tokens
        self.capacity, self.vram_budget = capacity, vram_budget
        self.model_path, self.profile_name = model_path, profile_name
        self._curves: dict[tuple, list[list[int]]] = {}
        self._sims: dict[tuple, SimResult] = {}
        self._preloads: dict[tuple[int, ...], list[list[int]]] = {}
        self.prefetch_accuracy, self.prefetch_accuracy_source = prefetch_accuracy(trace)
        # one evaluator per spread scenario: each replays the central plan's slots on its own trace
        self.scenarios = {name: Evaluator(profile, shape, t, accelerator=accelerator, context=context,
                                          prompt_tokens=prompt_tokens, capacity=capacity, vram_budget=vram_budget,
                                          model_path=model_path, profile_name=profile_name)
                          for name, t in (scenarios or {}).items()}

    @property
    def space(self) -> Space:
        return Space(max_budget=self.capacity.max_slots, max_threads=self.profile.physical_cores,
                     ids_known=self.trace.header.source != "synthetic")

    # -- curves and allocation
    def curves(self, policy: str, preload: bool, rule: MissRule) -> list[list[int]]:
        """Per layer, hits over the replayed trace for 0..E slots in that layer (see the module docstring)."""
        enters_all = rule.promote or rule.compute == "accelerator"
        key = ("static",) if policy == "static" else (policy, preload, True if enters_all else rule.transfer_min_tokens)
        if key not in self._curves:
            self._curves[key] = self._compute_curves(policy, preload, enters_all, rule)
        return self._curves[key]

    def _compute_curves(self, policy: str, preload: bool, enters_all: bool, rule: MissRule) -> list[list[int]]:
        L, E = self.shape.num_moe_layers, self.shape.num_experts
        if policy == "static":
            ranked = popular_preload(self.trace, [E] * L)  # most used first
            uses = [[0] * E for _ in range(L)]
            for position in range(len(self.trace.passes)):
                for l in range(L):
                    for e in self.trace.tokens_per_expert(position, l):
                        uses[l][e] += 1
            curves = []
            for l in range(L):
                running, c = 0, [0]
                for e in ranked[l]:
                    running += uses[l][e]
                    c.append(running)
                curves.append(c)
            return curves
        if policy == "lru" and not preload and enters_all:
            return lru_hit_curves(self.trace)
        # The cache state depends on the rule only through which misses enter: a representative rule.
        rep = MissRule("cpu", 0, True) if enters_all else MissRule("cpu", rule.transfer_min_tokens, False)
        curves = [[0] * (E + 1) for _ in range(L)]
        for s in range(1, E + 1):
            slots = [s] * L
            pre = self.preload_for(tuple(slots)) if preload else None
            result = simulate(self.trace, slots, policy, pre, rep)
            for l, counts in enumerate(result.per_layer):
                curves[l][s] = counts.hits
        return curves

    def preload_for(self, slots: tuple[int, ...]) -> list[list[int]]:
        """The plan's preload: the most used experts of the trace; on a synthetic trace, whose ids are a random
        labelling (what is popular there says nothing of the real model's ids), experts 0..s-1 of each layer:
        as arbitrary as the real model's would be, so a preload is predicted as the warm start it is."""
        if slots not in self._preloads:
            if self.trace.header.source == "synthetic":
                self._preloads[slots] = [list(range(s)) for s in slots]
            else:
                self._preloads[slots] = popular_preload(self.trace, list(slots))
        return self._preloads[slots]

    def allocation(self, choice: Choice) -> Allocation:
        rule = MissRule(choice.miss_compute, choice.transfer_min_tokens, choice.promote)
        return allocate(self.curves(choice.policy, choice.preload, rule), choice.budget)

    # -- plan and prediction
    def plan(self, choice: Choice, slots: tuple[int, ...]) -> Plan:
        preload = tuple(tuple(ids) for ids in self.preload_for(slots)) if choice.preload else None
        return Plan(
            model=ModelSpec(name=self.shape.name, path=self.model_path, dtype=self.shape.dtype,
                            experts=plan_experts(self.shape)),
            hardware=HardwareSpec(accelerator=self.accelerator, cpu_threads=choice.cpu_threads,
                                  profile=self.profile_name),
            cache=CacheSpec(slots=slots, policy=choice.policy, preload=preload),
            miss=MissSpec(compute=choice.miss_compute, transfer_min_tokens=choice.transfer_min_tokens,
                          promote=choice.promote),
            prefetch=PrefetchSpec(lookahead=choice.lookahead),
        )

    def replay(self, choice: Choice, slots: tuple[int, ...]) -> SimResult:
        rule = MissRule(choice.miss_compute, choice.transfer_min_tokens, choice.promote)
        key = (slots, choice.policy, choice.preload, rule, choice.lookahead)
        if key not in self._sims:
            pre = self.preload_for(slots) if choice.preload else None
            self._sims[key] = simulate(self.trace, list(slots), choice.policy, pre, rule,
                                       lookahead=choice.lookahead, prefetch_accuracy=self.prefetch_accuracy)
        return self._sims[key]

    def evaluate(self, choice: Choice) -> Candidate:
        choice = choice.canonical()
        slots = self.allocation(choice).slots
        plan = self.plan(choice, slots)
        prediction = predict(self.profile, self.shape, plan, self.replay(choice, slots), context=self.context,
                             prompt_tokens=self.prompt_tokens, vram_budget=self.vram_budget)
        excess = max(prediction.memory_bytes[d] - prediction.memory_limit_bytes[d] for d in prediction.memory_bytes)
        cap = self.capacity
        excess = max(excess, cap.fixed_bytes + sum(slots) * cap.expert_bytes - cap.limit_bytes)
        spread = tuple((name, predict(ev.profile, ev.shape, plan, ev.replay(choice, slots), context=self.context,
                                      prompt_tokens=self.prompt_tokens,
                                      vram_budget=self.vram_budget).decode_tokens_per_s)
                       for name, ev in self.scenarios.items())
        return Candidate(choice, plan, prediction, feasible=excess <= 0, excess_bytes=int(excess),
                         spread_decode=spread)
