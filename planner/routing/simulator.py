"""Replay a routing trace against a cache configuration and count hits, misses and copies.

`simulate` drives the runtime's own bookkeeping (`runtime.contracts.cache_policy.route_pass`) pass by pass and
layer by layer, so its hit and miss counts equal what `moeplan run` reports on the same routing, by
construction. Two assumptions, both stated in docs/traces.md: a promotion copy finishes before the next
pass starts, and a prefetch copy before the next layer starts (the runtime counts an expert as resident
only once its copy has finished; the cost model is where copy time is charged). Prefetch is the one
statistical mode: a guess is right with probability `prefetch_accuracy` (seeded).

`lru_hit_curves` gives lru hits for every slot count at once, `popular_preload` the static preload that
`tune` writes, and `belady` the offline optimum. Pure Python, no torch: the tuner calls this hundreds
of times.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.contracts.cache_policy import LayerCachePolicy, MissRule, admit_guesses, route_pass

from runtime.contracts.traces import PHASES, Trace

from .statistics import GuessAccuracy, best_ranks


@dataclass(frozen=True)
class LayerCounts:
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass(frozen=True)
class PassCounts:
    """Work of one forward pass, summed over its MoE layers (a mean when it describes many passes)."""

    passes: int  # how many passes this describes
    tokens: float  # tokens per pass
    hits: float  # needed experts resident at layer start
    hit_tokens: float  # token-expert pairs computed from resident experts
    cpu_misses: float  # misses computed on CPU threads
    cpu_miss_tokens: float  # token-expert pairs computed on the CPU
    accelerator_misses: float  # misses copied to the accelerator and computed there (one copy each)
    accelerator_miss_tokens: float  # token-expert pairs of those
    promotions: float  # background copies after a CPU miss that entered the cache
    prefetches: float  # background copies of prefetch guesses that entered the cache

    @property
    def misses(self) -> float:
        return self.cpu_misses + self.accelerator_misses

    @property
    def copies(self) -> float:
        """Expert copies host -> accelerator per pass, of every kind."""
        return self.accelerator_misses + self.promotions + self.prefetches


@dataclass(frozen=True)
class SimResult:
    hits: int  # over the replayed passes and every layer
    misses: int
    per_layer: tuple[LayerCounts, ...]
    decode: PassCounts  # mean per decode pass
    prefill: tuple[PassCounts, ...]  # one per prefill pass, in trace order (token counts differ a lot)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def prefill_mean(self) -> PassCounts:
        return _mean(self.prefill)


_FIELDS = ("tokens", "hits", "hit_tokens", "cpu_misses", "cpu_miss_tokens", "accelerator_misses",
           "accelerator_miss_tokens", "promotions", "prefetches")


def _mean(counts: Sequence[PassCounts]) -> PassCounts:
    n = len(counts)
    if n == 0:
        return PassCounts(0, *([0.0] * len(_FIELDS)))
    return PassCounts(n, *(sum(getattr(c, f) for c in counts) / n for f in _FIELDS))


def _check(trace: Trace, slots: Sequence[int], preload: Sequence[Sequence[int]] | None) -> None:
    L, E = trace.header.num_layers, trace.header.num_experts
    if len(slots) != L:
        raise ValueError(f"slots: has {len(slots)} entries but the trace has {L} MoE layers")
    for i, n in enumerate(slots):
        if not 0 <= n <= E:
            raise ValueError(f"slots[{i}]: must be in 0..{E}, got {n}")
    if preload is not None and len(preload) != L:
        raise ValueError(f"preload: has {len(preload)} lists but the trace has {L} MoE layers")


def simulate(trace: Trace, slots: Sequence[int], policy: str, preload: Sequence[Sequence[int]] | None,
             rule: MissRule, lookahead: int = 0, prefetch_accuracy: float | GuessAccuracy = 0.0,
             phases: Sequence[str] = PHASES, seed: int = 0, count_from: int = 0,
             replay_guesses: bool = False) -> SimResult:
    """Replay the passes of `phases` through one `LayerCachePolicy` per layer.

    Only the replayed passes from the `count_from`-th on are counted: the earlier ones warm the caches
    (an honest test of anything fitted on them).

    With `lookahead` 1, after layer l's lookup the guesses for layer l+1 are admitted into layer l+1's
    cache (`admit_guesses`, as the runtime admits them) before its lookup: each expert layer l+1 really
    needs is guessed with probability `prefetch_accuracy` (a `GuessAccuracy`: the one of layer l+1 and the
    expert's best rank in the pass), otherwise a random expert it does not need is guessed instead
    (random.Random(seed)). With `replay_guesses`, the guesses are instead the ones the
    trace recorded (`run --trace-out` records them, prefetch on or off): the runtime's own, so the counts
    equal what `run` reports with `lookahead: 1` on the same routing.
    """
    _check(trace, slots, preload)
    if lookahead not in (0, 1):
        raise ValueError(f"lookahead: must be 0 or 1, got {lookahead}")
    shares = [prefetch_accuracy.overall, *(a for row in prefetch_accuracy.by_layer_rank for a in row)] \
        if isinstance(prefetch_accuracy, GuessAccuracy) else [prefetch_accuracy]
    if not all(0.0 <= a <= 1.0 for a in shares):
        raise ValueError(f"prefetch_accuracy: must be in [0, 1], got {prefetch_accuracy}")
    if replay_guesses and lookahead and any(p.guesses is None for p in trace.passes if p.phase in phases):
        raise ValueError("replay_guesses: the trace has passes without recorded guesses")
    L, E = trace.header.num_layers, trace.header.num_experts
    preload = preload or [[] for _ in range(L)]
    caches = [LayerCachePolicy(slots[l], policy, preload[l]) for l in range(L)]
    rng = random.Random(seed)
    wanted = set(phases)
    layer_hits, layer_misses = [0] * L, [0] * L
    decode: list[PassCounts] = []
    prefill: list[PassCounts] = []
    replayed = -1
    for position, p in enumerate(trace.passes):
        if p.phase not in wanted:
            continue
        replayed += 1
        counted = replayed >= count_from
        c = [0] * 8  # hits, hit_tokens, cpu, cpu_tokens, acc, acc_tokens, promotions, prefetches
        for l in range(L):
            needed = trace.tokens_per_expert(position, l)
            out = route_pass(caches[l], needed, rule)
            if counted:
                layer_hits[l] += len(out.hits)
                layer_misses[l] += len(out.cpu_misses) + len(out.accelerator_misses)
            c[0] += len(out.hits)
            c[1] += sum(needed[e] for e in out.hits)
            c[2] += len(out.cpu_misses)
            c[3] += sum(needed[e] for e in out.cpu_misses)
            c[4] += len(out.accelerator_misses)
            c[5] += sum(needed[e] for e in out.accelerator_misses)
            c[6] += sum(1 for entry in out.entries if not entry.transfer)
            if lookahead and l + 1 < L:
                if replay_guesses:
                    nxt = caches[l + 1]
                    c[7] += len(admit_guesses(nxt, frozenset(p.guesses[l + 1]))) if nxt.admits else 0
                else:
                    c[7] += _prefetch(caches[l + 1], trace, position, l + 1, prefetch_accuracy, rng)
        if counted:
            counts = PassCounts(1, float(p.tokens), *map(float, c))
            (decode if p.phase == "decode" else prefill).append(counts)
    per_layer = tuple(LayerCounts(h, m) for h, m in zip(layer_hits, layer_misses))
    return SimResult(sum(layer_hits), sum(layer_misses), per_layer, _mean(decode), tuple(prefill))


def _prefetch(cache: LayerCachePolicy, trace: Trace, position: int, layer: int,
              accuracy: float | GuessAccuracy, rng: random.Random) -> int:
    """Admit this pass's guesses for `layer` (the next one); return how many were copied."""
    if not cache.admits:
        return 0
    needed = trace.tokens_per_expert(position, layer)
    if isinstance(accuracy, GuessAccuracy):
        ranks = best_ranks(trace, position, layer)
        right = [e for e in sorted(needed) if rng.random() < accuracy.of(layer, ranks[e])]
    else:
        right = [e for e in sorted(needed) if rng.random() < accuracy]
    others = [e for e in range(trace.header.num_experts) if e not in needed]
    wrong = rng.sample(others, min(len(needed) - len(right), len(others)))
    return len(admit_guesses(cache, frozenset(right) | frozenset(wrong)))


# ---- lru hits for every slot count at once -----------------------------------------------------------
def lru_hit_curves(trace: Trace, phases: Sequence[str] = PHASES) -> list[list[int]]:
    """Per layer, the lru hits (promote on: every miss enters) for each slot count 0..E, from empty caches.

    One pass over the trace per layer. Under lru with every miss entering, a cache of C slots always
    holds the C experts with the latest last use, where the last use of an expert is ordered by the last
    pass that needed it, then, within that pass, by the accounting order (the pass's hits were touched
    before its misses entered; each group ascending id). So an expert needed again is a hit with C
    slots iff (experts needed by later passes) + (experts of its own last pass that came after it in
    that pass's order) < C. The within-pass order depends on C (an expert that was a hit with C slots
    may have missed with fewer), so, unlike textbook stack distances, the hit sets are not nested; each
    expert keeps, per slot count, whether it missed in its last pass (one bitmask over C).
    """
    wanted = set(phases)
    L, E = trace.header.num_layers, trace.header.num_experts
    positions = [i for i, p in enumerate(trace.passes) if p.phase in wanted]
    curves = []
    all_c = (1 << (E + 1)) - 1
    for l in range(L):
        last = [-1] * E  # last pass (position in `positions`) that needed each expert
        missed = [all_c] * E  # bit C: the expert missed in its last pass with C slots
        diff = [0] * (E + 2)  # hits added for every C >= index
        explicit = [0] * (E + 1)
        for t, position in enumerate(positions):
            needed = sorted(trace.tokens_per_expert(position, l))
            # Group the resident history by last pass: experts needed later than pass q outrank q's.
            blocks: dict[int, list[int]] = {}
            for e in range(E):
                if last[e] >= 0:
                    blocks.setdefault(last[e], []).append(e)
            later = {}
            above = 0
            for q in sorted(blocks, reverse=True):
                later[q] = above
                above += len(blocks[q])
            new_masks = {}
            for e in needed:
                q = last[e]
                if q < 0:
                    new_masks[e] = all_c
                    continue
                d, block = later[q], blocks[q]
                # C <= d: a miss; C >= d + len(block): a hit; in between it depends on the block order.
                hits_from = d + len(block)
                diff[hits_from] += 1
                mask = (1 << (d + 1)) - 1
                m_e = missed[e]
                for c in range(d + 1, min(hits_from, E + 1)):
                    me = (m_e >> c) & 1
                    rank = d
                    for x in block:
                        if x == e:
                            continue
                        mx = (missed[x] >> c) & 1
                        # later in the pass's order: a miss after a hit, or same group and larger id
                        if mx > me or (mx == me and x > e):
                            rank += 1
                    if rank < c:
                        explicit[c] += 1
                    else:
                        mask |= 1 << c
                new_masks[e] = mask
            for e in needed:
                last[e] = t
                missed[e] = new_masks[e]
        hits, running = [0] * (E + 1), 0
        for c in range(E + 1):
            running += diff[c]
            hits[c] = running + explicit[c]
        hits[0] = 0
        curves.append(hits)
    return curves


# ---- static preload and the offline optimum ------------------------------------------------------------
def popular_preload(trace: Trace, slots: Sequence[int], phases: Sequence[str] = PHASES,
                    upto: int | None = None) -> list[list[int]]:
    """Per layer, the `slots[l]` experts needed by the most passes (ties: lower id), most used first;
    with `upto`, counted over the first `upto` passes of `phases` only (fitted on them).

    Counting passes rather than tokens is what a static cache's hits count: each needed expert once
    per pass.
    """
    L, E = trace.header.num_layers, trace.header.num_experts
    _check(trace, slots, None)
    positions = [i for i, p in enumerate(trace.passes) if p.phase in set(phases)][:upto]
    out = []
    for l in range(L):
        uses = [0] * E
        for position in positions:
            for e in trace.tokens_per_expert(position, l):
                uses[e] += 1
        ranked = sorted(range(E), key=lambda e: (-uses[e], e))
        out.append(ranked[:slots[l]])
    return out


def belady(trace: Trace, slots: Sequence[int], phases: Sequence[str] = PHASES, bypass: bool = False,
           count_from: int = 0) -> list[int]:
    """Per layer, the hits of the offline optimal cache among those where every miss enters (promote on),
    or, with `bypass`, among all caches (a miss may also not enter): the true offline optimum, which an
    online policy that declines some misses could approach from above the first bound.

    Starting empty, each pass's needed experts are looked up (a hit if resident), then all of them are
    made resident, evicting the resident experts whose next use is furthest away (never used again
    first); without `bypass` an expert needed by the current pass is evicted only when the pass needs
    more experts than there are slots, and then the ones needed again soonest stay. Hits are counted
    from the `count_from`-th replayed pass on.
    """
    _check(trace, slots, None)
    wanted = set(phases)
    L = trace.header.num_layers
    positions = [i for i, p in enumerate(trace.passes) if p.phase in wanted]
    never = len(positions)
    out = []
    for l in range(L):
        needs = [trace.tokens_per_expert(i, l) for i in positions]
        # next_use[t][e]: the first pass after t that needs e (never if none), built backwards.
        upcoming: dict[int, int] = {}
        next_use: list[dict[int, int]] = [{}] * len(needs)
        for t in range(len(needs) - 1, -1, -1):
            next_use[t] = {e: upcoming.get(e, never) for e in needs[t]}
            for e in needs[t]:
                upcoming[e] = t
        # resident expert -> its next use, kept current as passes go by
        cache: dict[int, int] = {}
        capacity, hits = slots[l], 0
        if capacity == 0:
            out.append(0)
            continue
        for t, needed in enumerate(needs):
            if t >= count_from:
                hits += sum(1 for e in needed if e in cache)
            nxt = next_use[t]
            for e in needed:
                cache[e] = nxt[e]
            if len(cache) > capacity:
                # Evict by furthest next use; without bypass the current pass's experts go last (only if
                # they must).
                order = sorted(cache, key=lambda e: (not bypass and e in needed, -cache[e], -e))
                for e in order[:len(cache) - capacity]:
                    del cache[e]
        out.append(hits)
    return out
