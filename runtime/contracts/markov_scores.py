"""The eviction and admission scores of the `markov` cache policy: how likely each expert is to be needed
by the layer's next pass.

A score is the sum of two estimates, both updated once per pass from the experts the pass needs:
- transitions: for each expert `a` the pass needs, the share of the passes after a pass that needed `a`
  which needed `e` (a Markov chain over a layer's expert sets, one pass to the next; counts that lose
  1 % of their weight per pass, so that a long run follows its routing as it drifts);
- frequency: `e`'s uses, each worth 0.9**(passes since), weighted so that a use in this pass counts as
  much as 0.2 of a transition share (recency and frequency, as in `adaptive`'s shadows).

On the recorded OLMoE trace a decayed use count alone predicts the next pass about as well as any mix of
recency and frequency features, and the transitions add what it misses: which experts follow the ones
the token just chose (bench/results/simulate_olmoe.md). The constants are the algorithm's, not the host's
or the model's, and the plan carries none: the transitions forget at the rate of `adaptive`'s longest
shadow (0.99, set beforehand: 150 passes cannot show what forgetting is worth over a long run), and the
frequency's decay and weight are the best of a small grid (decay 0.7, 0.8, 0.9 by weight 2, 4, 8 x
(1 - decay)) on the first half of that trace's decode passes alone.

Pure Python: the runtime and the simulator run this same code, so they agree exactly.
"""
from __future__ import annotations

from collections.abc import Sequence

from .adaptive_scores import DecayedCounts

FREQUENCY_DECAY = 0.9  # per pass: a half-life of about 6.6 passes
FREQUENCY_WEIGHT = 0.2  # a use in this pass is worth 0.2 of a certain transition
TRANSITION_DECAY = 0.99  # per pass: transition counts have a half-life of about 69 passes
PRIOR = 1.0  # pseudo-passes in each transition share's denominator: a first sighting is no certainty
_RENORMALISE_BELOW = 1e-100  # a row's scale factor is folded into its counts before it underflows


class _TransitionRow:
    """Decayed counts of the passes that followed a pass needing one expert: how many (`total`) and how
    many of them needed each expert. Kept lazily: stored values times `scale` are the counts at pass `at`."""

    def __init__(self) -> None:
        self.counts: dict[int, float] = {}
        self.total = 0.0
        self.scale = 1.0
        self.at = 0

    def add(self, following: Sequence[int], now: int) -> None:
        self.scale *= TRANSITION_DECAY ** (now - self.at)
        self.at = now
        if self.scale < _RENORMALISE_BELOW:
            self.counts = {e: v * self.scale for e, v in self.counts.items()}
            self.total *= self.scale
            self.scale = 1.0
        step = 1.0 / self.scale
        self.total += step
        for e in following:
            self.counts[e] = self.counts.get(e, 0.0) + step

    def share(self, expert: int, now: int) -> float:
        value = self.counts.get(expert)
        if value is None:
            return 0.0
        weight = self.scale * TRANSITION_DECAY ** (now - self.at)
        return value * weight / (self.total * weight + PRIOR)


class MarkovScores:
    """Scores of one layer's experts for the pass now running (`observe` it first)."""

    def __init__(self) -> None:
        self._frequency = DecayedCounts(FREQUENCY_DECAY)
        self._rows: dict[int, _TransitionRow] = {}
        self._current: tuple[int, ...] = ()
        self._now = 0
        self._memo: dict[int, float] = {}

    def observe(self, needed: Sequence[int]) -> None:
        """One pass's needed experts (ascending): learn the transitions from the previous pass to this one,
        count the uses, and score from this pass's experts on."""
        self._now += 1
        needed = tuple(needed)
        for a in self._current:
            row = self._rows.get(a)
            if row is None:
                row = self._rows[a] = _TransitionRow()
            row.add(needed, self._now)
        for e in needed:
            self._frequency.use(e, self._now)
        self._current = needed
        self._memo.clear()

    def score(self, expert: int) -> float:
        """How likely `expert` is to be needed by the next pass (a score, not a probability)."""
        value = self._memo.get(expert)
        if value is None:
            now = self._now
            value = FREQUENCY_WEIGHT * self._frequency.score(expert, now)
            for a in self._current:
                row = self._rows.get(a)
                if row is not None:
                    value += row.share(expert, now)
            self._memo[expert] = value
        return value
