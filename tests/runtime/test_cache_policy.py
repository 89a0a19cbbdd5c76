"""Each policy's eviction order on scripted sequences, static never evicting, and the pass accounting."""
from __future__ import annotations

import random

import pytest

from runtime.contracts.adaptive_scores import DECAYS
from runtime.contracts.cache_policy import LayerCachePolicy, MissRule, route_pass
from runtime.contracts.markov_scores import NEIGHBOUR_WINDOW, MarkovScores
from runtime.contracts.neighbour_votes import NeighbourVotes

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


def test_adaptive_follows_recency_on_a_recency_workload():
    # Expert 1 is used four times early, then never: a frequency policy keeps it; recency drops it.
    # The shadow with the shortest memory hits most on the alternating tail, so adaptive follows it.
    passes = [[1], [1], [1], [1]] + [[2], [3], [2], [3], [4], [3], [4], [3]]
    adaptive, lru, lfu = (LayerCachePolicy(2, p) for p in ("adaptive", "lru", "lfu"))
    hits = {name: replay(c, passes)[0] for name, c in (("adaptive", adaptive), ("lru", lru), ("lfu", lfu))}
    assert hits["adaptive"] == hits["lru"] > hits["lfu"]
    assert adaptive._adaptive.chosen_decay == min(DECAYS)


def test_adaptive_follows_frequency_on_a_frequency_workload():
    # Expert 1 comes back every third pass, with two one-off experts between: in 2 slots lru always
    # evicts 1 before it returns; a frequency order keeps it.
    passes = []
    for i in range(30):
        passes += [[1], [100 + 2 * i], [101 + 2 * i]]
    adaptive, lru = LayerCachePolicy(2, "adaptive"), LayerCachePolicy(2, "lru")
    assert replay(adaptive, passes)[0] > replay(lru, passes)[0]
    assert adaptive._adaptive.chosen_decay > min(DECAYS)  # a shadow that remembers beyond recency


def test_adaptive_keeps_the_most_used_when_a_pass_needs_more_than_slots():
    cache = LayerCachePolicy(2, "adaptive")
    replay(cache, [[5], [5], [5], [1, 2, 5]])  # 5 is the most used: it stays, unlike under lru
    assert 5 in cache.resident()
    lru = LayerCachePolicy(2, "lru")
    replay(lru, [[5], [5], [5], [1, 2, 5]])
    assert set(lru.resident()) == {1, 2}  # the last ones to enter stay


def test_markov_keeps_the_expert_that_follows_the_current_one():
    # 1, 2, 3 in a cycle through 2 slots: lru always evicts the expert needed next; markov learns that 2
    # follows 1, 3 follows 2 and 1 follows 3, and keeps the one the cycle comes back to first.
    passes = [[1], [2], [3]] * 20
    markov, lru = LayerCachePolicy(2, "markov"), LayerCachePolicy(2, "lru")
    assert replay(lru, passes)[0] == 0
    assert replay(markov, passes)[0] > len(passes) // 3


def test_markov_declines_a_miss_that_scores_below_its_victim():
    # 5 is used every pass, then 9 once: lru lets 9 push 5 out of the one slot; markov keeps 5.
    passes = [[5]] * 5 + [[9], [5]]
    markov, lru = LayerCachePolicy(1, "markov"), LayerCachePolicy(1, "lru")
    assert replay(lru, passes) == (4, 3)
    assert replay(markov, passes) == (5, 2)
    assert set(markov.resident()) == {5}
    out = route_pass(markov, {9: 1}, PROMOTE)  # 9's second use in a row, 5 not used now: still 5 stays
    assert out.cpu_misses == [9] and out.entries == [] and set(markov.resident()) == {5}


def test_markov_keeps_the_highest_scores_when_a_pass_needs_more_than_slots():
    cache = LayerCachePolicy(2, "markov")
    replay(cache, [[5], [5], [5], [1, 2, 5]])  # 5 is the most used: it stays; 1 and 2 tie, 1 entered first
    assert set(cache.resident()) == {1, 5}


def test_markov_admits_prefetch_guesses_without_its_score_test():
    cache = LayerCachePolicy(1, "markov")
    replay(cache, [[5]] * 5)
    slot, evicted = cache.admit(9, used=False, protected=frozenset({9}))
    assert evicted == 5 and cache.slot_of(9) == slot


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


def _scores_after(scores: MarkovScores, passes: list[tuple[int, ...]]) -> MarkovScores:
    for needed in passes:
        scores.observe(needed)
    return scores


def test_markov_neighbours_tell_apart_what_follows_a_whole_set():
    # {1, 2} and {3, 4} are followed by 5, {1, 3} and {2, 4} by 6: every single expert is followed by 5 and 6
    # alike, so the transitions cannot tell; the passes most like the current one (its neighbours) can.
    phrases = [((1, 2), (5,)), ((3, 4), (5,)), ((1, 3), (6,)), ((2, 4), (6,))]
    rng = random.Random(0)
    history = [p for _ in range(40) for p in rng.choice(phrases)]
    for current, follows, other in (((1, 2), 5, 6), ((1, 3), 6, 5), ((2, 4), 6, 5)):
        scores = _scores_after(MarkovScores(), [*history, current])
        assert scores.score(follows) > 2 * scores.score(other)
        alone = _scores_after(MarkovScores(neighbour_weight=0.0), [*history, current])
        assert alone.score(follows) < 1.5 * alone.score(other)  # transitions alone: about a tie


def test_markov_neighbours_use_the_pass_before_as_context():
    # {2} is followed by 5 after {1} and by 6 after {3}: only the pass before tells which.
    history = [p for _ in range(20) for p in ((1,), (2,), (5,), (3,), (2,), (6,))]
    for before, follows, other in ((1, 5, 6), (3, 6, 5)):
        scores = _scores_after(MarkovScores(), [*history, (before,), (2,)])
        assert scores.score(follows) > 2 * scores.score(other)
        blind = _scores_after(MarkovScores(neighbour_context=0.0), [*history, (before,), (2,)])
        assert blind.score(follows) < 1.5 * blind.score(other)


def test_markov_neighbour_bookkeeping_is_bounded():
    votes = NeighbourVotes(window=NEIGHBOUR_WINDOW, count=8, power=8.0, horizon=5, discount=0.7, context=0.5)
    for i in range(10 * NEIGHBOUR_WINDOW):
        votes.observe(tuple(sorted({i % 64, (i * 7 + 1) % 64})))
    assert len(votes._sets) == NEIGHBOUR_WINDOW + 1  # the window and the current pass
    # the lanes are rebased: no bitmap grows past a few windows of passes
    assert max(lanes.bit_length() for lanes in votes._columns.values()) <= 4 * NEIGHBOUR_WINDOW + 1


def test_markov_neighbour_shares_equal_a_plain_recomputation_once_the_window_is_full():
    # NeighbourVotes keeps a bounded window, bit-sliced, and carries the previous pass's overlaps over (shifted
    # as the window drops its oldest pass and as its lanes are rebased); recomputing every share from the whole
    # history gives the same numbers.
    window, count, power, horizon, discount, context = 12, 8, 2.0, 2, 0.5, 0.5
    rng = random.Random(1)
    history = [tuple(sorted(rng.sample(range(6), 3))) for _ in range(120)]  # many ties; rebased after 48
    kept = NeighbourVotes(window, count, power, horizon, discount, context)
    for t, needed in enumerate(history):
        kept.observe(needed)
        first = max(0, t - window)  # the passes the window holds besides the current one
        similarity = {j: len(set(history[j]) & set(needed))
                      + context * (len(set(history[j - 1]) & set(history[t - 1])) if j > first else 0)
                      for j in range(first, t)}
        ranked = sorted((s, j) for j, s in similarity.items())[-count:]
        expected: dict[int, float] = {}
        total = sum(s ** power for s, _ in ranked if s ** power > 0)
        for s, j in ranked:
            weight = s ** power
            if weight <= 0:
                continue
            for h in range(1, min(horizon, t - j) + 1):
                for e in history[j + h]:
                    expected[e] = expected.get(e, 0.0) + weight / total
                weight *= discount
        assert kept.shares.keys() == expected.keys()
        assert all(abs(kept.shares[e] - expected[e]) < 1e-9 for e in expected), t


def test_markov_neighbours_take_every_earlier_pass_while_fewer_than_count():
    kept = NeighbourVotes(window=10, count=4, power=1.0, horizon=1, discount=1.0, context=0.0)
    for needed in ((1, 2, 3), (1, 2), (1, 4), (1, 5)):  # at (1, 5) the 3 earlier passes tie at overlap 1
        kept.observe(needed)
    # each earlier pass votes 1/3 for what followed it: (1, 2) and (1, 4) after the first two, (1, 5) after the third
    assert kept.shares == pytest.approx({1: 1.0, 2: 1 / 3, 4: 1 / 3, 5: 1 / 3})
