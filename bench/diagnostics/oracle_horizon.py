"""How far ahead a cache must see: hit rates of a cache told the next H passes exactly, on the OLMoE trace.

Each pass, after its lookup, the cache keeps the `slots` experts (among the resident ones and the pass's
needed ones) whose next use within H passes comes soonest, ties by a use count decayed 0.9 a pass (so
H = 0 is that count alone). A miss may stay out (bypass), so H = the whole trace is Belady with bypass.
Hits counted on the second half of the decode passes, as in bench/simulate_olmoe.py: the numbers say what
a policy predicting only the next pass could reach at best.

    .venv/bin/python bench/diagnostics/oracle_horizon.py --slots 6 16 --horizons 0 1 2 3 5 10
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from runtime.contracts.adaptive_scores import DecayedCounts  # noqa: E402
from runtime.contracts.traces import load_trace  # noqa: E402


def oracle_hit_rate(needs: list[list[frozenset[int]]], slots: int, horizon: int, count_from: int) -> float:
    """`needs[l][t]`: layer l's experts at decode pass t."""
    hits = total = 0
    for layer in needs:
        resident: set[int] = set()
        counts = DecayedCounts(0.9)
        for t, needed in enumerate(layer):
            if t >= count_from:
                hits += len(needed & resident)
                total += len(needed)
            for e in needed:
                counts.use(e, t + 1)

            def key(e: int, t: int = t) -> tuple[int, float]:
                soonest = next((h for h in range(1, horizon + 1) if t + h < len(layer) and e in layer[t + h]),
                               horizon + 1)
                return -soonest, counts.score(e, t + 1)

            resident = set(sorted(resident | needed, key=key, reverse=True)[:slots])
    return hits / total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default="traces/olmoe-1b-7b-decode-299.jsonl")
    parser.add_argument("--slots", type=int, nargs="+", default=[6, 16])
    parser.add_argument("--horizons", type=int, nargs="+", default=[0, 1, 2, 3, 5, 10])
    args = parser.parse_args()
    trace = load_trace(args.trace)
    decode = [i for i, p in enumerate(trace.passes) if p.phase == "decode"]
    needs = [[frozenset(trace.tokens_per_expert(i, l)) for i in decode] for l in range(trace.header.num_layers)]
    print("| slots/layer | " + " | ".join(f"H = {h}" for h in args.horizons) + " |")
    print("|---|" + "---|" * len(args.horizons))
    for slots in args.slots:
        rates = [oracle_hit_rate(needs, slots, h, len(decode) // 2) for h in args.horizons]
        print(f"| {slots} | " + " | ".join(f"{r:.2%}" for r in rates) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
