"""The eviction and admission scores of the `markov` cache policy: how likely each expert is to be needed
by the layer's next passes.

A score is the sum of estimates, all updated once per pass from the experts the pass needs:
- transitions: for each expert `a` the pass needs, the share of the passes after a pass that needed `a`
  which needed `e` (a Markov chain over a layer's expert sets, one pass to the next; counts that lose
  1 % of their weight per pass, so that a long run follows its routing as it drifts);
- neighbours: the layer's last 256 expert sets are kept as bitmasks; the 8 earlier passes most like this
  one (overlap with this pass's set, plus 0.5 x the overlap of the pass before each with the pass before
  this one) vote, each by its similarity to the 8th power, for the experts needed in the 5 passes after
  it (each pass further worth 0.7 of the one before); the weighted mean, times 16. This is what looks
  more than one pass ahead: a cache told the exact next pass reaches only 0.91 of Belady at 25 % cached
  on the OLMoE trace (docs/benchmarks.md), so the rest of the gap needs the passes after it;
- frequency: `e`'s uses, each worth 0.9**(passes since), times FREQUENCY_WEIGHT (0 now: with the
  neighbours it no longer adds hits on the first half of the OLMoE trace, and its bookkeeping is skipped).

The constants are the algorithm's, not the host's or the model's, and the plan carries none: the
transitions forget at the rate of `adaptive`'s longest shadow (0.99, set beforehand). The neighbours'
constants and the frequency weight are the best of a grid (window 64/128/256, count 4-32, power 1-8,
horizon 1-12, discount 0.5-0.9, weight 1-16, context 0-1, frequency weight 0-0.4) by the hits on the first
half of the recorded OLMoE trace's decode passes alone, summed over 6 and 16 slots per layer (10 and 25 %
cached); the second half is what bench/results/simulate_olmoe.md reports.

Bookkeeping per pass: the neighbour search is bit-sliced (runtime/contracts/neighbour_votes.py), then about
8 x 5 x top-k dict updates collect the votes (bench/results/policy_overhead.md).

Pure Python: the runtime and the simulator run this same code, so they agree exactly.
"""
from __future__ import annotations

from collections.abc import Sequence

from .adaptive_scores import DecayedCounts
from .neighbour_votes import NeighbourVotes

FREQUENCY_DECAY = 0.9  # per pass: a half-life of about 6.6 passes
FREQUENCY_WEIGHT = 0.0  # off: with the neighbours it no longer adds hits (module docstring)
TRANSITION_DECAY = 0.99  # per pass: transition counts have a half-life of about 69 passes
NEIGHBOUR_WEIGHT = 16.0  # the neighbours' vote counts 16 times a transition share
NEIGHBOUR_WINDOW = 256  # earlier passes kept for the neighbour search
NEIGHBOUR_COUNT = 8  # neighbours per pass
NEIGHBOUR_POWER = 8.0  # a neighbour's weight: its similarity to the current pass, to the 8th power
NEIGHBOUR_HORIZON = 5  # passes after a neighbour that vote
NEIGHBOUR_DISCOUNT = 0.7  # each pass further after a neighbour counts 0.7 of the one before
NEIGHBOUR_CONTEXT = 0.5  # weight of the previous passes' overlap in a neighbour's similarity
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

    def __init__(self, frequency_weight: float = FREQUENCY_WEIGHT, neighbour_weight: float = NEIGHBOUR_WEIGHT,
                 neighbour_context: float = NEIGHBOUR_CONTEXT) -> None:
        """The module's constants; the weights and the neighbours' context can be set apart to measure
        what each part adds (tests, bench/diagnostics/markov_neighbour_cost.py)."""
        self._frequency_weight = frequency_weight
        self._frequency = DecayedCounts(FREQUENCY_DECAY) if frequency_weight else None
        self._neighbour_weight = neighbour_weight
        self._neighbours = NeighbourVotes(NEIGHBOUR_WINDOW, NEIGHBOUR_COUNT, NEIGHBOUR_POWER, NEIGHBOUR_HORIZON,
                                          NEIGHBOUR_DISCOUNT, neighbour_context) if neighbour_weight else None
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
        if self._frequency is not None:
            for e in needed:
                self._frequency.use(e, self._now)
        self._current = needed
        if self._neighbours is not None:
            self._neighbours.observe(needed)
        self._memo.clear()

    def score(self, expert: int) -> float:
        """How likely `expert` is to be needed by the next passes (a score, not a probability)."""
        value = self._memo.get(expert)
        if value is None:
            now = self._now
            value = self._frequency_weight * self._frequency.score(expert, now) if self._frequency is not None else 0.0
            if self._neighbours is not None:
                value += self._neighbour_weight * self._neighbours.shares.get(expert, 0.0)
            for a in self._current:
                row = self._rows.get(a)
                if row is not None:
                    value += row.share(expert, now)
            self._memo[expert] = value
        return value
