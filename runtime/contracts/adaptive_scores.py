"""The eviction scores of the `adaptive` cache policy: decayed use counts, with the decay chosen online.

Each expert's score is its uses, each one worth decay**(passes since). A decay near 0 ranks experts by
recency (lru), near 1 by frequency (lfu); which is best changes along a run (on the recorded OLMoE trace
the decay that hit most on the first half of the decode passes, 0.99, hit less than lru on the second half
at 25 % cached: bench/results/simulate_olmoe.md). So, in the spirit of ARC's ghost lists, a shadow
cache of the same size runs for each of a few decays, counting only what it would have hit, and the real
cache evicts by the scores of the shadow that has hit most lately. Nothing is fitted to a trace and the
plan carries no parameter: the decays span recency to frequency and are the algorithm's, not the host's.

Pure Python: the runtime and the simulator run this same code, so they agree exactly.
"""
from __future__ import annotations

from collections.abc import Sequence

# Per-pass decays of the shadows: half-lives of 1, 6.6 and 69 passes (recency ... frequency).
DECAYS = (0.5, 0.9, 0.99)
# How fast the choice among the shadows forgets their hits: half-life of about 3 passes.
CHOICE_DECAY = 0.8


class DecayedCounts:
    """Use counts that lose `decay` of their weight per pass, kept lazily (value, pass of last update)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self._value: dict[int, float] = {}
        self._at: dict[int, int] = {}

    def score(self, expert: int, now: int) -> float:
        value = self._value.get(expert)
        return 0.0 if value is None else value * self.decay ** (now - self._at[expert])

    def use(self, expert: int, now: int) -> None:
        self._value[expert] = self.score(expert, now) + 1.0
        self._at[expert] = now


class _Shadow:
    """A cache of the real one's size that evicts by one decay's scores and counts its own hits."""

    def __init__(self, slots: int, decay: float, preload: Sequence[int]) -> None:
        self.slots = slots
        self.counts = DecayedCounts(decay)
        self.resident = set(preload)

    def step(self, needed: Sequence[int], now: int) -> int:
        hits = sum(1 for e in needed if e in self.resident)
        for e in needed:
            self.counts.use(e, now)
        for e in needed:  # ascending id, as the real cache admits
            if e in self.resident or self.slots == 0:
                continue
            if len(self.resident) >= self.slots:
                others = [x for x in self.resident if x not in needed] or list(self.resident)
                self.resident.remove(min(others, key=lambda x: (self.counts.score(x, now), x)))
            self.resident.add(e)
        return hits


class AdaptiveScores:
    """The scores the `adaptive` policy evicts by: those of the shadow with the most recent hits."""

    def __init__(self, slots: int, preload: Sequence[int] = ()) -> None:
        self._shadows = [_Shadow(slots, d, preload) for d in DECAYS]
        self._recent_hits = [0.0] * len(DECAYS)
        self._chosen = 0
        self._now = 0

    def observe(self, needed: Sequence[int]) -> None:
        """One pass's needed experts (ascending): pick the shadow to follow for this pass's evictions (by
        the hits before it), then let every shadow take the pass."""
        self._now += 1
        self._chosen = max(range(len(DECAYS)), key=lambda i: (self._recent_hits[i], -i))
        for i, shadow in enumerate(self._shadows):
            self._recent_hits[i] = self._recent_hits[i] * CHOICE_DECAY + shadow.step(needed, self._now)

    def score(self, expert: int) -> float:
        return self._shadows[self._chosen].counts.score(expert, self._now)

    @property
    def chosen_decay(self) -> float:
        return DECAYS[self._chosen]
