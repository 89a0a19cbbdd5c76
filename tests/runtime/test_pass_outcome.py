"""The cache policy's one-outcome-per-pass helpers: the no-cache outcome equals `route_pass`'s wherever it
is used, and prefetch admission is the one function the runtime and the simulator share."""
from __future__ import annotations

import random

import pytest

from runtime.contracts.cache_policy import (LayerCachePolicy, MissRule, admit_guesses, all_cpu_outcome,
                                            caches_nothing, route_pass)

RULES = [MissRule(), MissRule(promote=True), MissRule(transfer_min_tokens=1), MissRule(transfer_min_tokens=4),
         MissRule(compute="accelerator"), MissRule(transfer_min_tokens=4, promote=True)]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("slots,policy", [(0, "lru"), (0, "static"), (2, "lru"), (3, "lfu")])
def test_all_cpu_outcome_is_route_pass_where_nothing_is_cached(rule, slots, policy):
    rng = random.Random(slots)
    reference, cache = LayerCachePolicy(slots, policy), LayerCachePolicy(slots, policy)
    for _ in range(50):
        tokens = rng.choice([1, 1, 1, 3, 6])
        needed: dict[int, int] = {}
        for _ in range(tokens):
            for e in rng.sample(range(8), 2):
                needed[e] = needed.get(e, 0) + 1
        expected = route_pass(reference, needed, rule)
        if caches_nothing(cache, rule, max(needed.values())):
            assert all_cpu_outcome(needed) == expected
            assert slots == 0 and not expected.hits and not expected.entries and not expected.accelerator_misses
        else:  # the cases it does not cover: slots, or a miss that reaches the accelerator
            assert route_pass(cache, needed, rule) == expected
            assert slots > 0 or expected.accelerator_misses


def test_caches_nothing_only_without_slots_and_accelerator_misses():
    none = LayerCachePolicy(0, "lru")
    assert caches_nothing(none, MissRule(transfer_min_tokens=4, promote=True), 1)
    assert not caches_nothing(none, MissRule(transfer_min_tokens=4), 4)  # a prefill reaches the threshold
    assert not caches_nothing(none, MissRule(compute="accelerator"), 1)  # copied to scratch
    assert not caches_nothing(LayerCachePolicy(1, "lru"), MissRule(), 1)


def test_admit_guesses_copies_in_id_order_and_never_evicts_a_guess():
    cache = LayerCachePolicy(3, "lru")
    route_pass(cache, {5: 1, 6: 1, 7: 1}, MissRule(promote=True))  # 5, 6, 7 resident, 5 least recent
    copies = admit_guesses(cache, frozenset({7, 2, 1}))
    assert copies == [(1, cache.slot_of(1)), (2, cache.slot_of(2))]  # 7 was resident: no copy
    assert set(cache.resident()) == {1, 2, 7}  # 5 and 6 went, by lru; the guesses stayed
    # 3 takes 7's slot; then only guesses are resident, and 4 does not enter
    assert admit_guesses(cache, frozenset({3, 4, 1, 2})) == [(3, cache.slot_of(3))]
    assert set(cache.resident()) == {1, 2, 3}
    assert admit_guesses(LayerCachePolicy(2, "static", [0, 1]), frozenset({4})) == []
    assert admit_guesses(LayerCachePolicy(0, "lru"), frozenset({4})) == []
