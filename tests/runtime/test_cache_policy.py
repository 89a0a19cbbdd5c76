"""Each policy's eviction order on scripted sequences, static never evicting, and the pass accounting."""
from __future__ import annotations

import pytest

from runtime.contracts.cache_policy import LayerCachePolicy, MissRule, route_pass

PROMOTE = MissRule(compute="cpu", promote=True)


def replay(cache: LayerCachePolicy, passes: list[list[int]], rule: MissRule = PROMOTE):
    hits = misses = 0
    for needed in passes:
        out = route_pass(cache, {e: 1 for e in needed}, rule)
        hits += len(out.hits)
        misses += len(out.cpu_misses) + len(out.accelerator_misses)
    return hits, misses


def test_lru_evicts_least_recently_used():
    cache = LayerCachePolicy(2, "lru")
    replay(cache, [[1], [2], [1], [3]])  # 2 is least recent when 3 enters
    assert set(cache.resident()) == {1, 3}


def test_fifo_evicts_oldest_entry_even_if_used():
    cache = LayerCachePolicy(2, "fifo")
    replay(cache, [[1], [2], [1], [3]])  # 1 entered first: it goes, although just used
    assert set(cache.resident()) == {2, 3}


def test_lfu_evicts_least_used_ties_by_recency():
    cache = LayerCachePolicy(2, "lfu")
    replay(cache, [[1], [1], [2], [3]])  # 2 used once, 1 twice
    assert set(cache.resident()) == {1, 3}
    cache = LayerCachePolicy(2, "lfu")
    replay(cache, [[1], [2], [3]])  # tie: 1 and 2 used once, 1 less recently
    assert set(cache.resident()) == {2, 3}


def test_static_never_evicts():
    cache = LayerCachePolicy(2, "static", preload=[5, 6])
    hits, misses = replay(cache, [[1, 5], [2, 3], [6], [5, 6]])
    assert set(cache.resident()) == {5, 6}
    assert (hits, misses) == (4, 3)


def test_hits_and_misses_counted_once_per_pass():
    cache = LayerCachePolicy(3, "lru")
    assert replay(cache, [[1, 2], [1, 2, 3], [3, 4]]) == (3, 4)


def test_last_ones_to_enter_stay_when_pass_needs_more_than_slots():
    cache = LayerCachePolicy(2, "lru")
    replay(cache, [[1, 2, 3, 4]])
    assert set(cache.resident()) == {3, 4}


def test_no_promotion_means_cpu_misses_never_enter():
    cache = LayerCachePolicy(2, "lru")
    assert replay(cache, [[1], [1], [1]], MissRule(compute="cpu", promote=False)) == (0, 3)


def test_transfer_threshold_and_accelerator_compute():
    cache = LayerCachePolicy(2, "lru")
    out = route_pass(cache, {1: 5, 2: 1}, MissRule(compute="cpu", transfer_min_tokens=4))
    assert out.accelerator_misses == [1] and out.cpu_misses == [2]
    assert set(cache.resident()) == {1}
    out = route_pass(cache, {2: 1, 3: 1}, MissRule(compute="accelerator"))
    assert out.accelerator_misses == [2, 3] and out.cpu_misses == []


def test_zero_slots_never_admit():
    cache = LayerCachePolicy(0, "lru")
    assert replay(cache, [[1], [1]]) == (0, 2)
    assert cache.admit(1) is None


def test_prefetch_admission_protects_guesses():
    cache = LayerCachePolicy(2, "lru")
    replay(cache, [[1, 2]])
    assert cache.admit(3, used=False, protected=frozenset({1, 2, 3})) is None  # would evict a guess
    slot, evicted = cache.admit(3, used=False, protected=frozenset({2, 3}))
    assert evicted == 1 and cache.slot_of(3) == slot


def test_hit_slots_are_taken_before_entries_reuse_them():
    cache = LayerCachePolicy(1, "lru")
    route_pass(cache, {1: 1}, PROMOTE)
    out = route_pass(cache, {1: 1, 2: 1}, PROMOTE)  # 1 hits, then 2 enters in its slot
    assert out.hit_slots == {1: 0} and out.entries[0].slot == 0 and out.entries[0].evicted == 1


@pytest.mark.parametrize("slots,policy,preload", [(-1, "lru", ()), (1, "mru", ()), (1, "lru", (1, 2))])
def test_bad_construction(slots, policy, preload):
    with pytest.raises(ValueError):
        LayerCachePolicy(slots, policy, preload)
