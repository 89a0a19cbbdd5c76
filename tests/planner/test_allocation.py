"""The exact slot allocation: optimal against brute force, on curves greedy gets wrong too."""
from __future__ import annotations

import itertools
import random

import pytest

from planner.tune.allocation import allocate


def brute_force(curves, budget):
    best = None
    for slots in itertools.product(*(range(len(c)) for c in curves)):
        if sum(slots) <= budget:
            value = sum(c[s] for c, s in zip(curves, slots))
            if best is None or value > best:
                best = value
    return best


def greedy(curves, budget):
    slots = [0] * len(curves)
    for _ in range(budget):
        gains = [(c[s + 1] - c[s], -l) for l, (c, s) in enumerate(zip(curves, slots)) if s + 1 < len(c)]
        if not gains:
            break
        _, neg = max(gains)
        slots[-neg] += 1
    return sum(c[s] for c, s in zip(curves, slots))


@pytest.mark.parametrize("seed", range(40))
def test_dp_matches_brute_force_on_random_curves(seed: int) -> None:
    rng = random.Random(seed)
    layers, experts = rng.randint(1, 4), rng.randint(1, 5)
    # Non-decreasing hit-like curves, concave or not, with plateaus and ties.
    curves = []
    for _ in range(layers):
        c = [0]
        for _ in range(experts):
            c.append(c[-1] + rng.choice([0, 0, 1, 2, 5, 9]))
        curves.append(c)
    for budget in range(layers * experts + 2):
        a = allocate(curves, budget)
        assert a.total <= budget
        assert all(0 <= s < len(c) for s, c in zip(a.slots, curves))
        assert a.value == sum(c[s] for c, s in zip(curves, a.slots))
        assert a.value == brute_force(curves, budget), (curves, budget, a)


def test_dp_beats_greedy_on_a_convex_curve() -> None:
    # Layer 0 pays only with both slots (a pair of experts always used together); greedy takes layer 1's
    # first slot and never reaches the pair.
    curves = [[0, 0, 10], [0, 6, 7]]
    assert greedy(curves, 2) == 7
    a = allocate(curves, 2)
    assert a.slots == (2, 0) and a.value == 10


def test_unused_budget_stays_unused_and_ties_take_fewer_slots() -> None:
    a = allocate([[0, 3, 3, 3], [0, 1, 1]], 10)
    assert a.slots == (1, 1) and a.value == 4


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="budget: must be >= 0, got -1"):
        allocate([[0, 1]], -1)
    with pytest.raises(ValueError, match=r"curves\[1\]: empty"):
        allocate([[0, 1], []], 1)
