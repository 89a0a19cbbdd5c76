"""Bookkeeping of one MoE layer's expert cache: which experts are resident, in which slot, and who goes next.

Pure Python with no torch import, so that the runtime (which moves the weights) and the planner's
simulator (which only counts) run the very same code and report the same hits and misses.

The accounting rules (docs/run.md, "Cache accounting"):
- each forward pass, the layer needs a set of experts; each needed expert counts once, as a hit when it
  is resident at layer start, else as a miss (`lookup`);
- hits are touched first (ascending id), then misses enter (ascending id) through `admit`;
- an entering expert takes a free slot, else evicts by policy: lru the least recently used, fifo the
  oldest entry, lfu the fewest uses since it entered (ties: least recently used), adaptive the lowest
  decayed use count with the decay chosen online (runtime/contracts/adaptive_scores.py; ties: least
  recently used), markov the lowest predicted chance of being needed by the next passes
  (runtime/contracts/markov_scores.py; ties: least recently used). The victim is never
  an expert this pass needs unless every resident one is needed, and then the least recently
  touched goes, so that the last ones to enter stay (adaptive and markov: the lowest score goes);
- markov also admits by score: a miss enters only if it scores above the victim it would evict (else
  it stays out and the victim stays); a prefetch guess enters without that test;
- `static` never changes the preloaded set.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .adaptive_scores import AdaptiveScores
from .markov_scores import MarkovScores

POLICIES = ("lru", "lfu", "fifo", "adaptive", "markov", "static")
MISS_COMPUTE = ("cpu", "accelerator")  # where a missed expert is computed (MissRule.compute)


@dataclass
class _Entry:
    slot: int
    entered: int  # clock at entry: fifo order
    last_use: int  # clock at the latest touch: lru order, lfu tie-break
    uses: int  # touches since entry: lfu order


class LayerCachePolicy:
    """Resident set and eviction order of one layer's cache of `slots` experts."""

    def __init__(self, slots: int, policy: str, preload: Sequence[int] = ()) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if slots < 0:
            raise ValueError(f"slots must be >= 0, got {slots}")
        if len(preload) > slots:
            raise ValueError(f"{len(preload)} preloaded experts do not fit in {slots} slots")
        self.slots = slots
        self.policy = policy
        self._clock = 0
        self._entries: dict[int, _Entry] = {}
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._needed: frozenset[int] = frozenset()
        self._adaptive = AdaptiveScores(slots, preload) if policy == "adaptive" else None
        self._markov = MarkovScores() if policy == "markov" else None
        # the score that orders evictions, where the policy has one (adaptive, markov)
        self._scores = self._adaptive or self._markov
        for expert in preload:  # preloaded experts are resident but not yet used
            self._insert(expert, used=False)

    # ---- queries ----------------------------------------------------------------------------
    def __contains__(self, expert: int) -> bool:
        return expert in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def slot_of(self, expert: int) -> int:
        return self._entries[expert].slot

    def resident(self) -> dict[int, int]:
        """Resident experts and their slots."""
        return {e: entry.slot for e, entry in self._entries.items()}

    @property
    def admits(self) -> bool:
        """Whether this cache ever takes a new expert (not under static, not with zero slots)."""
        return self.policy != "static" and self.slots > 0

    # ---- one pass ---------------------------------------------------------------------------
    def lookup(self, needed: Iterable[int]) -> tuple[list[int], list[int]]:
        """Split this pass's needed experts into hits and misses (both ascending); touch the hits."""
        ordered = sorted(set(needed))
        self._needed = frozenset(ordered)
        if self._scores is not None:
            self._scores.observe(ordered)
        hits = [e for e in ordered if e in self._entries]
        misses = [e for e in ordered if e not in self._entries]
        for e in hits:
            self._touch(self._entries[e])
        return hits, misses

    def admit(self, expert: int, used: bool = True,
              protected: frozenset[int] | None = None) -> tuple[int, int | None] | None:
        """Make `expert` resident; return (its slot, the evicted expert or None), or None if it cannot enter.

        `used` is False for a prefetch guess (it enters without a use). `protected` replaces this pass's
        needed set as the experts that are evicted only when nothing else is left (prefetch passes the
        guessed set; with every resident expert guessed, the guess does not enter).
        """
        if not self.admits:
            return None
        if expert in self._entries:
            return self._entries[expert].slot, None
        evicted = None
        if not self._free:
            keep = self._needed if protected is None else protected
            victim = self._victim(keep, strict=protected is not None)
            if victim is None:
                return None
            if used and self._markov is not None and self._markov.score(expert) <= self._markov.score(victim):
                return None  # admission: the victim is likelier to be needed next than the miss
            evicted = victim
            self._free.append(self._entries.pop(victim).slot)
        return self._insert(expert, used), evicted

    # ---- internals --------------------------------------------------------------------------
    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _touch(self, entry: _Entry) -> None:
        entry.last_use = self._tick()
        entry.uses += 1

    def _insert(self, expert: int, used: bool) -> int:
        now = self._tick()
        slot = self._free.pop()
        self._entries[expert] = _Entry(slot=slot, entered=now, last_use=now, uses=1 if used else 0)
        return slot

    def _victim(self, keep: frozenset[int], strict: bool) -> int | None:
        candidates = [e for e in self._entries if e not in keep]
        if not candidates:
            if strict:
                return None
            if self._scores is not None:
                # Every resident expert is needed by this pass: under adaptive and markov the lowest score
                # goes, so that the pass's most used experts stay (what lifts its hits where top-k > slots).
                score = self._scores.score
                return min(self._entries, key=lambda e: (score(e), self._entries[e].last_use))
            # Every resident expert is needed by this pass: the least recently touched goes, so that
            # the last ones to enter stay.
            return min(self._entries, key=lambda e: self._entries[e].last_use)
        if self.policy == "fifo":
            return min(candidates, key=lambda e: self._entries[e].entered)
        if self.policy == "lfu":
            return min(candidates, key=lambda e: (self._entries[e].uses, self._entries[e].last_use))
        if self._scores is not None:
            score = self._scores.score
            return min(candidates, key=lambda e: (score(e), self._entries[e].last_use))
        return min(candidates, key=lambda e: self._entries[e].last_use)  # lru


@dataclass(frozen=True)
class MissRule:
    """What happens to a missed expert (the plan's `miss:` section)."""

    compute: str = "cpu"  # cpu | accelerator
    transfer_min_tokens: int = 0  # a miss with at least this many tokens goes to the accelerator; 0 = never
    promote: bool = False  # a CPU-computed miss is copied into the cache afterwards

    def on_accelerator(self, tokens: int) -> bool:
        return self.compute == "accelerator" or 0 < self.transfer_min_tokens <= tokens

    @property
    def ever_on_accelerator(self) -> bool:
        """Whether some pass computes a miss on the accelerator (a transfer): the transfer buffers are needed."""
        return self.compute == "accelerator" or self.transfer_min_tokens > 0


@dataclass(frozen=True)
class Entry:
    """An expert that entered the cache during a pass: copied into `slot`, replacing `evicted`."""

    expert: int
    slot: int
    evicted: int | None
    transfer: bool  # True: copied to be computed on the accelerator now; False: promoted after a CPU miss


@dataclass(frozen=True)
class PassOutcome:
    """One layer's decisions for one forward pass, in the order the runtime carries them out."""

    hits: list[int]  # resident at layer start: computed from their slots
    hit_slots: dict[int, int]  # the slot of each hit at layer start (an entry may reuse it afterwards)
    accelerator_misses: list[int]  # copied and computed on the accelerator
    cpu_misses: list[int]  # computed on CPU threads from host memory
    entries: list[Entry]  # cache changes, in entry order (ascending expert id)


def route_pass(cache: LayerCachePolicy, tokens_per_expert: dict[int, int], rule: MissRule) -> PassOutcome:
    """Count hits and misses of one pass, decide where each miss runs, and update the cache.

    `tokens_per_expert` maps each needed expert to how many of the pass's tokens chose it.
    """
    hits, misses = cache.lookup(tokens_per_expert)
    hit_slots = {e: cache.slot_of(e) for e in hits}
    accelerator, cpu, entries = [], [], []
    for expert in misses:
        transfer = rule.on_accelerator(tokens_per_expert[expert])
        (accelerator if transfer else cpu).append(expert)
        if transfer or rule.promote:
            placed = cache.admit(expert)
            if placed is not None:
                entries.append(Entry(expert, placed[0], placed[1], transfer))
    return PassOutcome(hits, hit_slots, accelerator, cpu, entries)


def caches_nothing(cache: LayerCachePolicy, rule: MissRule, tokens: int) -> bool:
    """Whether `route_pass` makes every expert of a pass whose experts have at most `tokens` tokens each a
    CPU miss and changes nothing: a cache of no slots (nothing hits, nothing enters) and no miss that the
    rule sends to the accelerator (`on_accelerator` grows with the token count). Then `all_cpu_outcome` is
    its outcome. Decided once per layer for one token: a decode token of an `accelerator: cpu` plan asks in
    every layer."""
    return cache.slots == 0 and not rule.on_accelerator(tokens)


def all_cpu_outcome(needed: Iterable[int]) -> PassOutcome:
    """`route_pass`'s outcome where `caches_nothing` holds, without its bookkeeping: every needed expert a
    CPU miss, in ascending id, no entry."""
    return PassOutcome([], {}, [], sorted(needed), [])


def admit_guesses(cache: LayerCachePolicy, guesses: frozenset[int]) -> list[tuple[int, int]]:
    """Admit a prefetch's guesses for this layer's next pass; returns the (expert, slot) copies to make, in
    ascending id. Guesses already resident need no copy; each one entering does so without a use and may
    evict any resident expert but another guess (`admit(..., used=False, protected=guesses)`), so that a
    guess never pushes out another. The runtime and the simulator both admit through here."""
    copies = []
    for expert in sorted(guesses):
        if expert in cache:
            continue
        placed = cache.admit(expert, used=False, protected=guesses)
        if placed is not None:
            copies.append((expert, placed[0]))
    return copies
