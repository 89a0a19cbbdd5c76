from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trace_factory import OLMOE, decode_sequence, make_trace

from planner.routing.simulator import belady, lru_hit_curves, popular_preload, simulate
from planner.routing.statistics import GuessAccuracy
from runtime.contracts.traces import Trace, load_trace
from runtime.contracts.cache_policy import MissRule

PROMOTE = MissRule(promote=True)


def _hits(trace, slots, policy, preload=None, rule=PROMOTE):
    return simulate(trace, [slots] * trace.header.num_layers, policy, preload, rule).hits


# ---- hand-worked sequences -------------------------------------------------------------------------
def test_lru_evicts_least_recently_used():
    # 0 m {0} | 1 m {0,1} | 0 h | 2 m evicts 1 -> {0,2} | 1 m
    r = simulate(decode_sequence([0, 1, 0, 2, 1], 4), [2], "lru", None, PROMOTE)
    assert (r.hits, r.misses, r.hit_rate) == (1, 4, 0.2)
    assert r.decode.passes == 5 and r.decode.promotions == 4 / 5 and r.decode.cpu_misses == 4 / 5


def test_fifo_evicts_oldest_entry():
    # 0 m | 1 m | 0 h | 2 m evicts 0 (oldest) -> {1,2} | 1 h
    assert _hits(decode_sequence([0, 1, 0, 2, 1], 4), 2, "fifo") == 2


def test_lfu_evicts_least_used_and_differs_from_lru():
    seq = decode_sequence([0, 0, 1, 2, 1], 4)
    # lfu: 2 evicts 1 (one use) and keeps 0 (two uses) -> 1 misses; lru evicts 0 -> 1 hits
    assert (_hits(seq, 2, "lfu"), _hits(seq, 2, "lru")) == (1, 2)


def test_static_keeps_the_preloaded_set():
    r = simulate(decode_sequence([3, 0, 3, 0], 4), [1], "static", [[3]], PROMOTE)
    assert (r.hits, r.misses, r.decode.promotions) == (2, 2, 0)


def test_zero_slots_never_hit_and_never_copy():
    r = simulate(decode_sequence([1, 1, 1], 4), [0], "lru", None, PROMOTE)
    assert (r.hits, r.misses, r.decode.copies) == (0, 3, 0)


def test_without_promotion_cpu_misses_never_enter():
    r = simulate(decode_sequence([1, 1, 1], 4), [2], "lru", None, MissRule(promote=False))
    assert (r.hits, r.decode.promotions, r.decode.cpu_misses) == (0, 0, 1)


def test_pass_needing_more_experts_than_slots_keeps_the_last_to_enter():
    # {0,1,2} with 2 slots: 0 and 1 enter, 2 evicts 0 -> {1,2}; then 1 hits, 0 misses
    trace = make_trace([("decode", [[[0, 1, 2]]]), ("decode", [[[0, 1, 3]]])], 4, 3)
    r = simulate(trace, [2], "lru", None, PROMOTE)
    assert (r.hits, r.misses) == (1, 5)


def test_transfer_threshold_sends_popular_prefill_misses_to_the_accelerator():
    # prefill: expert 0 chosen by 3 tokens (>= 2: copied and computed there), expert 1 by one (CPU)
    trace = make_trace([("prefill", [[[0], [0], [0], [1]]]), ("decode", [[[0]]]), ("decode", [[[1]]])], 4, 1)
    r = simulate(trace, [2], "lru", None, MissRule(transfer_min_tokens=2, promote=False))
    (pre,) = r.prefill
    assert (pre.tokens, pre.accelerator_misses, pre.accelerator_miss_tokens, pre.cpu_misses, pre.cpu_miss_tokens) \
        == (4, 1, 3, 1, 1)
    assert (r.hits, r.misses) == (1, 3)  # the transferred expert 0 stays; expert 1 never entered
    assert r.decode.hits == 0.5 and r.decode.hit_tokens == 0.5 and r.decode.passes == 2
    only_decode = simulate(trace, [2], "lru", None, MissRule(transfer_min_tokens=2), phases=("decode",))
    assert (only_decode.hits, only_decode.misses, only_decode.prefill) == (0, 2, ())


def test_compute_on_accelerator_copies_every_miss():
    r = simulate(decode_sequence([0, 1, 0], 4), [2], "fifo", None, MissRule(compute="accelerator"))
    assert (r.hits, r.decode.accelerator_misses, r.decode.cpu_misses) == (1, 2 / 3, 0)


def test_prefetch_with_perfect_guesses_makes_the_next_layer_hit():
    # layer 1 always needs expert 0 of 2: a right guess is 0, a wrong one is 1
    trace = make_trace([("decode", [[[e]], [[0]]]) for e in (0, 1, 0, 1)], 2, 1)
    rule = MissRule(promote=False)
    right = simulate(trace, [1, 1], "lru", None, rule, lookahead=1, prefetch_accuracy=1.0)
    wrong = simulate(trace, [1, 1], "lru", None, rule, lookahead=1, prefetch_accuracy=0.0)
    assert right.per_layer[1].hits == 4 and right.decode.prefetches == 0.25
    # the wrong guess (expert 1) is copied once and then stays resident: no further copies
    assert wrong.per_layer[1].hits == 0 and wrong.decode.prefetches == 0.25
    assert right.per_layer[0] == wrong.per_layer[0]  # layer 0 has no previous layer to guess it


def test_prefetch_takes_each_layers_measured_accuracy():
    # layers 1 and 2 always need expert 0 of 2; layer 1 is always guessed right, layer 2 never
    trace = make_trace([("decode", [[[e]], [[0]], [[0]]]) for e in (0, 1, 0, 1)], 2, 1)
    table = GuessAccuracy(0.5, ((), (1.0,), (0.0,)))
    r = simulate(trace, [1, 1, 1], "lru", None, MissRule(promote=False), lookahead=1, prefetch_accuracy=table)
    assert (r.per_layer[1].hits, r.per_layer[2].hits) == (4, 0)
    with pytest.raises(ValueError, match="prefetch_accuracy"):
        simulate(trace, [1, 1, 1], "lru", None, PROMOTE, lookahead=1,
                 prefetch_accuracy=GuessAccuracy(0.5, ((), (1.5,), (0.0,))))


def test_bad_arguments_name_the_field():
    trace = decode_sequence([0], 4)
    with pytest.raises(ValueError, match="slots: has 2 entries"):
        simulate(trace, [1, 1], "lru", None, PROMOTE)
    with pytest.raises(ValueError, match=r"slots\[0\]: must be in 0..4, got 5"):
        simulate(trace, [5], "lru", None, PROMOTE)
    with pytest.raises(ValueError, match="prefetch_accuracy"):
        simulate(trace, [1], "lru", None, PROMOTE, lookahead=1, prefetch_accuracy=2.0)


def test_popular_preload_and_belady_by_hand():
    trace = decode_sequence([2, 1, 2, 3, 2, 1], 4)
    assert popular_preload(trace, [2]) == [[2, 1]]
    # 2 m {2} | 1 m {1,2} | 2 h | 3 m: evict 1 (next use 5) or 2 (next use 4) -> evict 1 | 2 h | 1 m
    assert belady(trace, [2]) == [2]
    assert belady(trace, [0]) == [0] and belady(trace, [4]) == [3]


# ---- lru hit curves ----------------------------------------------------------------------------------
def test_lru_hit_curves_equal_simulate_at_every_slot_count_on_olmoe():
    trace = load_trace(OLMOE)
    curves = lru_hit_curves(trace)
    for slots in range(trace.header.num_experts + 1):
        result = simulate(trace, [slots] * 16, "lru", None, PROMOTE)
        assert [c.hits for c in result.per_layer] == [curve[slots] for curve in curves], slots


@st.composite
def traces(draw, max_layers=2, max_passes=25):
    num_experts = draw(st.integers(2, 7))
    top_k = draw(st.integers(1, min(3, num_experts)))
    layers = draw(st.integers(1, max_layers))
    row = st.lists(st.integers(0, num_experts - 1), min_size=top_k, max_size=top_k, unique=True)
    passes = []
    for _ in range(draw(st.integers(1, max_passes))):
        phase = draw(st.sampled_from(("prefill", "decode")))
        tokens = draw(st.integers(1, 4)) if phase == "prefill" else 1
        passes.append((phase, [[draw(row) for _ in range(tokens)] for _ in range(layers)]))
    return make_trace(passes, num_experts, top_k)


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(traces(), st.sampled_from([("prefill", "decode"), ("decode",)]))
def test_lru_hit_curves_equal_simulate_on_random_traces(trace, phases):
    curves = lru_hit_curves(trace, phases=phases)
    for slots in range(trace.header.num_experts + 1):
        result = simulate(trace, [slots] * trace.header.num_layers, "lru", None, PROMOTE, phases=phases)
        assert [c.hits for c in result.per_layer] == [curve[slots] for curve in curves]


@FAST
@given(traces(), st.data())
def test_belady_is_never_worse_than_any_admitting_policy(trace, data):
    slots = data.draw(st.integers(0, trace.header.num_experts))
    bound = sum(belady(trace, [slots] * trace.header.num_layers))
    for policy in ("lru", "lfu", "fifo", "adaptive"):
        for rule in (PROMOTE, MissRule(compute="accelerator"), MissRule(transfer_min_tokens=2, promote=True)):
            assert _hits(trace, slots, policy, rule=rule) <= bound, (policy, rule)
    # The bound with bypass also bounds empty-start caches that decline misses (no promotion: only
    # accelerator transfers enter). Static's warm start is outside both bounds.
    free = sum(belady(trace, [slots] * trace.header.num_layers, bypass=True))
    assert free >= bound
    for policy in ("lru", "adaptive", "markov"):
        assert _hits(trace, slots, policy, rule=MissRule(transfer_min_tokens=2)) <= free
    # markov declines misses that score below their victim: only the bound with bypass holds for it
    for rule in (PROMOTE, MissRule(compute="accelerator"), MissRule(transfer_min_tokens=2, promote=True)):
        assert _hits(trace, slots, "markov", rule=rule) <= free, rule


@FAST
@given(traces(), st.data())
def test_counting_from_a_pass_counts_only_the_later_passes(trace, data):
    """count_from replays every pass (the caches warm) but counts from the given one: the counts over a
    split add up to the whole, for the simulator and for both bounds."""
    passes = len(trace.passes)
    split = data.draw(st.integers(0, passes))
    slots = [data.draw(st.integers(0, trace.header.num_experts))] * trace.header.num_layers
    policy = data.draw(st.sampled_from(("lru", "adaptive", "markov")))
    whole = simulate(trace, slots, policy, None, PROMOTE)
    later = simulate(trace, slots, policy, None, PROMOTE, count_from=split)
    first = Trace(trace.header, trace.passes[:split])
    early = simulate(first, slots, policy, None, PROMOTE)
    assert (early.hits + later.hits, early.misses + later.misses) == (whole.hits, whole.misses)
    for bypass in (False, True):
        assert sum(belady(trace, slots, bypass=bypass, count_from=split)) + sum(
            belady(first, slots, bypass=bypass)) == sum(belady(trace, slots, bypass=bypass))


@FAST
@given(traces())
def test_more_slots_never_lower_the_hit_rate_under_lru_and_static(trace):
    E, L = trace.header.num_experts, trace.header.num_layers
    lru = [_hits(trace, s, "lru") for s in range(E + 1)]
    static = [_hits(trace, s, "static", popular_preload(trace, [s] * L)) for s in range(E + 1)]
    assert lru == sorted(lru) and static == sorted(static)
