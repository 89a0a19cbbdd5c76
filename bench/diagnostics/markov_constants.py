"""markov's two constants set beforehand (the transitions' prior and forgetting rate): second-half hit rates
on the OLMoE trace over a grid of them, and the pick the declared criterion makes on the first half.

The evaluation is bench/simulate_olmoe.py's: decode passes, every CPU miss offered to the cache, 6 and 16
slots per layer (10 and 25 % cached). The pick replays the first half alone and sums its hits at both
sizes (the criterion runtime/contracts/markov_scores.py names); the second half is what is reported, as a
ratio to Belady's bound at the same size.

    .venv/bin/python bench/diagnostics/markov_constants.py
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import runtime.contracts.markov_scores as markov  # noqa: E402
from planner.routing.simulator import belady, simulate  # noqa: E402
from runtime.contracts.cache_policy import MissRule  # noqa: E402
from runtime.contracts.traces import Trace, load_trace  # noqa: E402

PRIORS = (0.25, 0.5, 1.0, 2.0, 4.0)
DECAYS = (0.98, 0.99, 0.995, 1.0)
SLOTS = (6, 16)


def main() -> int:
    trace = load_trace(ROOT / "traces" / "olmoe-1b-7b-decode-299.jsonl")
    decode = [p for p in trace.passes if p.phase == "decode"]
    half = len(decode) // 2
    first = Trace(trace.header, tuple(decode[:half]))
    layers = trace.header.num_layers
    rule = MissRule(promote=True)
    bound = {s: sum(belady(trace, [s] * layers, phases=("decode",), count_from=half)) for s in SLOTS}
    rows = []
    for prior, decay in itertools.product(PRIORS, DECAYS):
        markov.PRIOR, markov.TRANSITION_DECAY = prior, decay
        first_hits = sum(simulate(first, [s] * layers, "markov", None, rule, phases=("decode",)).hits for s in SLOTS)
        second = {s: simulate(trace, [s] * layers, "markov", None, rule, phases=("decode",), count_from=half).hits
                  for s in SLOTS}
        rows.append((first_hits, prior, decay, second))
        print(f"prior {prior:<5} decay {decay:<6} first half {first_hits:6d} hits; second half / Belady: "
              + ", ".join(f"{s} slots {second[s] / bound[s]:.4f}" for s in SLOTS), flush=True)
    best = max(rows, key=lambda r: r[0])
    print(f"criterion's pick: prior {best[1]}, decay {best[2]}: "
          + ", ".join(f"{s} slots {best[3][s] / bound[s]:.4f}" for s in SLOTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
