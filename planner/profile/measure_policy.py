"""What each cache policy's bookkeeping costs per MoE layer and pass on this host.

The runtime calls `route_pass` (runtime/contracts/cache_policy.py) once per MoE layer of every pass of a
plan whose layer caches anything, on the CPU, between the router and the experts: on a GPU host it is
part of every token's critical path, and the adaptive and markov policies cost several times lru's
(bench/results/policy_overhead.md). It is pure Python, so it is timed here as it runs: the runtime's own
call on a seeded random routing of the layer's width (every pass `top_k` distinct experts, one token
each), promotion on, after enough passes that the policies' histories are full.
"""
from __future__ import annotations

import random
import statistics
import time

from runtime.contracts.cache_policy import POLICIES, LayerCachePolicy, MissRule, route_pass

from .records import PolicyRow
from .settings import significant

WARM_PASSES = 300  # markov keeps the layer's last 256 expert sets (runtime/contracts/markov_scores.py)
TIMED_PASSES = 200


def slot_counts(experts: int) -> list[int]:
    """The slot counts timed for a layer of `experts`: one, a quarter and a half of the experts."""
    return sorted({max(1, experts // 4), max(1, experts // 2), 1} - {experts})


def time_policy(policy: str, experts: int, top_k: int, slots: int, repeats: int, seed: int = 0) -> PolicyRow:
    """One `PolicyRow`: the median over `repeats` of the mean seconds per `route_pass` call."""
    rng = random.Random(seed)
    passes = [{e: 1 for e in rng.sample(range(experts), top_k)} for _ in range(WARM_PASSES + TIMED_PASSES)]
    rule = MissRule(promote=True)
    per_call = []
    for _ in range(repeats):
        cache = LayerCachePolicy(slots, policy)
        for needed in passes[:WARM_PASSES]:
            route_pass(cache, needed, rule)
        start = time.perf_counter()
        for needed in passes[WARM_PASSES:]:
            route_pass(cache, needed, rule)
        per_call.append((time.perf_counter() - start) / TIMED_PASSES)
    median = statistics.median(per_call)
    spread = (max(per_call) - min(per_call)) / median if median > 0 else 0.0
    return PolicyRow(policy=policy, experts=experts, top_k=top_k, slots=slots, median_s=significant(median),
                     spread=round(spread, 3))


def time_policies(experts: int, top_k: int, repeats: int) -> list[PolicyRow]:
    """Every policy at each of `slot_counts(experts)`."""
    return [time_policy(policy, experts, top_k, slots, repeats) for policy in POLICIES for slots in slot_counts(experts)]
