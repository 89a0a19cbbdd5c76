"""What markov's neighbour term costs: µs per `route_pass` call of markov as shipped against markov without
it (the transitions plus 0.2 x a decayed use count, as before the neighbours), and lru, on the recorded
OLMoE decode trace; the three take turns within each repeat and the medians are printed.

    .venv/bin/python bench/diagnostics/markov_neighbour_cost.py --slots 16 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from runtime.contracts.cache_policy import LayerCachePolicy, MissRule, route_pass  # noqa: E402
from runtime.contracts.markov_scores import MarkovScores  # noqa: E402
from runtime.contracts.traces import load_trace  # noqa: E402


def without_neighbours(slots: int) -> LayerCachePolicy:
    cache = LayerCachePolicy(slots, "markov")
    cache._markov = cache._scores = MarkovScores(frequency_weight=0.2, neighbour_weight=0.0)
    return cache


def us_per_call(needs: list[list[dict[int, int]]], make: Callable[[], LayerCachePolicy]) -> float:
    caches = [make() for _ in needs[0]]
    rule = MissRule(promote=True)
    start = time.perf_counter()
    for per_layer in needs:
        for cache, needed in zip(caches, per_layer):
            route_pass(cache, needed, rule)
    return (time.perf_counter() - start) / (len(needs) * len(caches)) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default="traces/olmoe-1b-7b-decode-299.jsonl")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    trace = load_trace(args.trace)
    L = trace.header.num_layers
    needs = [[trace.tokens_per_expert(i, l) for l in range(L)] for i in range(len(trace.passes))]
    variants = {"lru": lambda: LayerCachePolicy(args.slots, "lru"),
                "markov without neighbours": lambda: without_neighbours(args.slots),
                "markov": lambda: LayerCachePolicy(args.slots, "markov")}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, make in variants.items():
            times[name].append(us_per_call(needs, make))
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.1f} us/call over {args.repeats} repeats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
