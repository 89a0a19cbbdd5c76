"""Where markov loses to Belady: its hit rates when its admission test, its choice of victim, or both are
made exact (told each expert's next use), on the OLMoE trace.

markov takes two decisions per miss: which resident expert is the victim (the lowest score), and whether the
miss enters at all (it must score above that victim). Here either decision can be replaced by the offline
one: the victim is the candidate needed again latest, and the miss enters only if it is needed again sooner
than the victim. Everything else is markov's own code (`LayerCachePolicy`, `route_pass`). Evaluation as in
bench/simulate_olmoe.py: decode passes, every CPU miss offered to the cache, hits counted on the second half;
ratios to Belady's bound (every miss enters) at the same size. The numbers say how much of the gap each
decision holds, not what an online policy can reach.

    .venv/bin/python bench/diagnostics/markov_oracle_decisions.py --slots 6 16 32
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from planner.routing.simulator import belady  # noqa: E402
from runtime.contracts.cache_policy import LayerCachePolicy, MissRule, route_pass  # noqa: E402
from runtime.contracts.traces import load_trace  # noqa: E402

NEVER = 1 << 30  # next-use distance of an expert not needed again


class _NextUse:
    """A score that is minus the passes until an expert is next needed (exact: read from the trace)."""

    def __init__(self, layer: list[frozenset[int]], cache: "_OracleCache") -> None:
        self._layer, self._cache = layer, cache

    def observe(self, needed: Iterable[int]) -> None:  # the cache counts the passes
        pass

    def score(self, expert: int) -> float:
        t = self._cache.now
        return -next((u - t for u in range(t + 1, len(self._layer)) if expert in self._layer[u]), NEVER)


class _OracleCache(LayerCachePolicy):
    """markov, with the victim (`exact_victim`) and/or the admission test (`exact_admission`) made exact.

    LayerCachePolicy orders evictions by `_scores` and admits by `_markov`'s scores: each can be swapped."""

    def __init__(self, slots: int, layer: list[frozenset[int]], exact_victim: bool, exact_admission: bool) -> None:
        super().__init__(slots, "markov")
        self.now = -1
        oracle = _NextUse(layer, self)
        self._observed = self._markov  # markov's scores keep learning whichever decision they still take
        if exact_victim:
            self._scores = oracle
        if exact_admission:
            self._markov = oracle

    def lookup(self, needed: Iterable[int]) -> tuple[list[int], list[int]]:
        self.now += 1
        ordered = sorted(set(needed))
        if self._scores is not self._observed:
            self._observed.observe(ordered)  # lookup observes `_scores` only
        return super().lookup(ordered)


def hits(needs: list[list[frozenset[int]]], slots: int, exact_victim: bool, exact_admission: bool,
         count_from: int) -> int:
    rule = MissRule(promote=True)
    total = 0
    for layer in needs:
        cache = _OracleCache(slots, layer, exact_victim, exact_admission)
        for t, needed in enumerate(layer):
            out = route_pass(cache, {e: 1 for e in needed}, rule)
            total += len(out.hits) if t >= count_from else 0
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default="traces/olmoe-1b-7b-decode-299.jsonl")
    parser.add_argument("--slots", type=int, nargs="+", default=[6, 16, 32])
    args = parser.parse_args()
    trace = load_trace(args.trace)
    decode = [i for i, p in enumerate(trace.passes) if p.phase == "decode"]
    half = len(decode) // 2
    layers = trace.header.num_layers
    needs = [[frozenset(trace.tokens_per_expert(i, l)) for i in decode] for l in range(layers)]
    cases = (("markov", False, False), ("exact admission", False, True), ("exact victim", True, False),
             ("both exact", True, True))
    print("| slots/layer | " + " | ".join(f"{name} / Belady" for name, _, _ in cases) + " |")
    print("|---|" + "---|" * len(cases))
    for slots in args.slots:
        bound = sum(belady(trace, [slots] * layers, phases=("decode",), count_from=half))
        ratios = [hits(needs, slots, v, a, half) / bound for _, v, a in cases]
        print(f"| {slots} | " + " | ".join(f"{r:.3f}" for r in ratios) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
