"""Split a budget of expert slots across MoE layers so that the total of per-layer gains is largest.

Given one gain curve per layer (`curves[l][s]`: what layer l gains with s slots, e.g. its cache hits
over a replayed trace), `allocate` finds slot counts with `sum(slots) <= budget` that maximise
`sum(curves[l][slots[l]])`. Greedy on marginal gains is optimal only when every curve is concave;
real hit curves are not (lru's are not even nested, see `planner.routing.simulator.lru_hit_curves`), so this is
an exact dynamic programme over (layer, slots used so far): O(L * budget * max slots) additions, a
few milliseconds for Mixtral's 32 layers x 8 experts. Pure Python.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Allocation:
    slots: tuple[int, ...]  # slots per layer, in layer order
    value: float  # sum of curves[l][slots[l]]

    @property
    def total(self) -> int:
        return sum(self.slots)


def allocate(curves: Sequence[Sequence[float]], budget: int) -> Allocation:
    """The slot counts (at most `budget` in all, at most len(curves[l]) - 1 in layer l) of largest total gain.

    Ties: the fewest slots in total (a budget larger than useful leaves slots unused rather than
    spending them on nothing), then a fixed order, so the result is deterministic.
    """
    if budget < 0:
        raise ValueError(f"budget: must be >= 0, got {budget}")
    if not curves:
        raise ValueError("curves: need at least one layer")
    for l, c in enumerate(curves):
        if len(c) == 0:
            raise ValueError(f"curves[{l}]: empty (need the gain for 0 slots at least)")
    L = len(curves)
    cap = min(budget, sum(len(c) - 1 for c in curves))
    # best[b]: largest gain of layers 0..l using exactly b slots (None: impossible);
    # choice[l][b]: the slots layer l takes in that optimum.
    neg = None
    best: list[float | None] = [neg] * (cap + 1)
    best[0] = 0.0
    choice: list[list[int]] = []
    for l in range(L):
        curve = curves[l]
        top = len(curve) - 1
        nxt: list[float | None] = [neg] * (cap + 1)
        pick = [0] * (cap + 1)
        for b in range(cap + 1):
            for s in range(min(top, b) + 1):
                prev = best[b - s]
                if prev is None:
                    continue
                v = prev + curve[s]
                # strict '>' keeps the smallest s for this layer among equal gains
                if nxt[b] is None or v > nxt[b]:
                    nxt[b], pick[b] = v, s
        best = nxt
        choice.append(pick)
    # The fewest total slots among the best totals.
    value = max(v for v in best if v is not None)
    b = min(i for i, v in enumerate(best) if v is not None and v == value)
    slots = [0] * L
    for l in range(L - 1, -1, -1):
        slots[l] = choice[l][b]
        b -= slots[l]
    return Allocation(slots=tuple(slots), value=float(value))
