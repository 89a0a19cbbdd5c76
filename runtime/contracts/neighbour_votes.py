"""The nearest-neighbour vote of the `markov` cache policy: what followed the past passes most like this one.

A past pass's similarity to the current one is the experts they share, plus `context` times the experts
shared by the passes just before each (a second pass of context tells apart passes that look alike alone).
Each pass, the `count` most similar of the last `window` passes (ties: the most recent) are its neighbours,
each weighted by its similarity to the `power`; an expert's share is the weighted mean over neighbours of
whether it was needed 1, 2, ... `horizon` passes after the neighbour, each pass further counting `discount`
times the one before. The oldest pass of a full window gets no context (its predecessor has left).

Bookkeeping is bit-sliced, so that a pass costs a few dozen integer operations rather than one per kept
pass: each expert has a bitmap of the passes that needed it (one bit per pass, a "lane"), the similarities
of every kept pass are summed lane-wise into bit planes (plane i holds bit i of every lane's sum), and the
`count` largest are found by a radix select over the planes. Then about count x horizon x top-k dict
updates collect the votes. Pure Python: the runtime and the simulator run this same code.
"""
from __future__ import annotations

from collections import deque
from fractions import Fraction

_MAX_CONTEXT_DENOMINATOR = 16  # `context` is taken as a fraction num/den: similarities are den x (shared) + num x ...


def _add_lanes(planes: list[int], lanes: int) -> None:
    """Add 1 to the bit-sliced count of every lane set in `lanes` (planes least significant first)."""
    for i, plane in enumerate(planes):
        planes[i] = plane ^ lanes
        lanes &= plane
        if not lanes:
            return
    planes.append(lanes)


def _sum(a: list[int], b: list[int]) -> list[int]:
    """Lane-wise sum of two bit-sliced numbers."""
    out, carry = [], 0
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else 0
        y = b[i] if i < len(b) else 0
        out.append(x ^ y ^ carry)
        carry = (x & y) | (carry & (x ^ y))
    if carry:
        out.append(carry)
    return out


def _times(planes: list[int], factor: int) -> list[int]:
    """Lane-wise product of a bit-sliced number and a small non-negative integer."""
    out: list[int] = []
    shift = 0
    while factor:
        if factor & 1:
            out = _sum(out, [0] * shift + planes) if out else [0] * shift + planes
        factor >>= 1
        shift += 1
    return out


def _bits_ascending(lanes: int) -> list[int]:
    out = []
    while lanes:
        low = lanes & -lanes
        out.append(low.bit_length() - 1)
        lanes ^= low
    return out


class NeighbourVotes:
    """The neighbours' shares for the pass just observed (`shares`: expert -> weighted mean vote). The vote
    is counted when `shares` is first read after a pass: a pass whose cache admits and evicts nothing (all
    hits, free slots, no promotion) never reads it."""

    def __init__(self, window: int, count: int, power: float, horizon: int, discount: float,
                 context: float = 0.0) -> None:
        if window < 1 or count < 1 or horizon < 1:
            raise ValueError(f"window, count and horizon must be >= 1, got {window}, {count}, {horizon}")
        self.window, self.count, self.power, self.horizon, self.discount = window, count, power, horizon, discount
        ratio = Fraction(context).limit_denominator(_MAX_CONTEXT_DENOMINATOR)
        self._den, self._num = ratio.denominator, ratio.numerator
        self._columns: dict[int, int] = {}  # expert -> lanes of the passes that needed it
        self._previous: list[int] = []  # the last pass's overlap planes
        self._sets: deque[tuple[int, ...]] = deque(maxlen=window + 1)  # the kept passes, the current one last
        self._pass = -1  # the current pass's number
        self._base = 0  # the pass number of lane 0
        self._shares: dict[int, float] | None = {}
        self._ballot: tuple[list[int], int, int] | None = None  # the last pass's (keys, window, t) to vote on

    def observe(self, needed: tuple[int, ...]) -> None:
        t = self._pass = self._pass + 1
        if t - self._base >= 4 * self.window:
            self._rebase(t)
        self._sets.append(needed)
        lo = max(0, t - self.window)  # the oldest kept pass
        window = ((1 << (t - lo)) - 1) << (lo - self._base)  # the lanes of the kept passes before this one
        overlaps: list[int] = []
        columns = self._columns
        for e in needed:
            lanes = columns.get(e, 0)
            _add_lanes(overlaps, lanes & window)
            columns[e] = lanes | (1 << (t - self._base))
        keys = _times(overlaps, self._den)
        if self._num:
            # the last pass's overlap with each pass before it, moved one lane up: lane j holds the overlap of
            # pass j - 1 with pass t - 1; the oldest kept pass has none
            context = window & ~(1 << (lo - self._base))
            keys = _sum(keys, _times([(p << 1) & context for p in self._previous], self._num))
        self._previous = overlaps
        self._ballot, self._shares = (keys, window, t), None

    @property
    def shares(self) -> dict[int, float]:
        if self._shares is None:  # the kept passes and lanes are those of the last `observe` until the next
            self._shares = self._vote(*self._ballot)
        return self._shares

    def _rebase(self, t: int) -> None:
        """Drop the lanes of passes no longer kept (nor needed as the oldest kept pass's context)."""
        shift = max(0, t - self.window - 1) - self._base
        self._base += shift
        self._columns = {e: lanes >> shift for e, lanes in self._columns.items() if lanes >> shift}
        self._previous = [p >> shift for p in self._previous]

    def _vote(self, keys: list[int], window: int, t: int) -> dict[int, float]:
        if not window:
            return {}
        # radix select: the lanes above the count-th largest key, and those equal to it
        above, n_above, equal = 0, 0, window
        for plane in reversed(keys):
            ones = equal & plane
            k = ones.bit_count()
            if n_above + k >= self.count:
                equal = ones
            else:
                above |= ones
                n_above += k
                equal &= ~plane
        chosen = _bits_ascending(above)
        tail: list[int] = []
        while equal and n_above + len(tail) < self.count:  # ties: the most recent
            lane = equal.bit_length() - 1
            tail.append(lane)
            equal ^= 1 << lane
        chosen += reversed(tail)
        shares: dict[int, float] = {}
        get = shares.get
        total = 0.0
        sets, first = self._sets, t - len(self._sets) + 1  # pass number of sets[0]
        discount, horizon, base = self.discount, self.horizon, self._base
        for lane in chosen:
            key = 0
            for i, plane in enumerate(keys):
                key |= ((plane >> lane) & 1) << i
            weight = (key / self._den) ** self.power
            if weight <= 0.0:
                continue
            total += weight
            j = lane + base
            for h in range(j + 1 - first, min(j + horizon, t) + 1 - first):
                for e in sets[h]:
                    shares[e] = get(e, 0.0) + weight
                weight *= discount
        if total > 0.0:
            for e in shares:
                shares[e] /= total
        return shares
