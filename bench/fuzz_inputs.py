"""Fuzz the plan, profile, trace and config.json loaders with mutated documents; count the outcomes.

    .venv/bin/python bench/fuzz_inputs.py --examples 2000 [--seed 0]

Per loader: accepted, rejected cleanly (a UserError subclass), crashed (any other exception, or no
answer within the per-example deadline). Writes bench/results/fuzz_inputs.md. The strategies are the
ones tests/test_fuzz_inputs.py runs a few hundred examples of (tests/input_mutations.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

import input_mutations as im  # noqa: E402


def fuzz(name: str, examples: int, rng_seed: int) -> tuple[Counter, dict[str, str], float]:
    counts: Counter = Counter()
    crashes: dict[str, str] = {}
    ws = im.Workspace()

    @seed(rng_seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(im.strategy(name))
    def run(data):
        result = im.outcome(ws, name, data)
        kind = result.split(":")[0]
        counts[kind] += 1
        if kind == "crashed":
            crashes.setdefault(result, repr(data)[:300])

    start = time.perf_counter()
    try:
        run()
    finally:
        ws.close()
    return counts, crashes, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="examples per loader (2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz_inputs.md")
    args = parser.parse_args()
    rows, details = [], []
    for name in im.LOADERS:
        counts, crashes, seconds = fuzz(name, args.examples, args.seed)
        total = sum(counts.values())
        rows.append(f"| {name} | {total} | {counts['accepted']} | {counts['rejected']} | {counts['crashed']} "
                    f"| {seconds:.1f} |")
        print(rows[-1], flush=True)
        for message, example in crashes.items():
            details.append(f"- {name}: `{message}` on `{example}`")
    from runtime.atomic import write_atomic

    text = (f"# Fuzzing the input loaders\n\n`.venv/bin/python bench/fuzz_inputs.py --examples {args.examples} "
            f"--seed {args.seed}` (hypothesis; strategies in tests/input_mutations.py; per-example deadline "
            f"{im.DEADLINE_S:.0f} s; hypothesis may run fewer examples than asked when it exhausts a strategy).\n\n"
            "| loader | examples | accepted | rejected (UserError) | crashed | seconds |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            + ("## Crashes\n\n" + "\n".join(details) + "\n" if details else "No crash and no hang.\n"))
    write_atomic(args.out, text)
    print(f"wrote {args.out}")
    return 1 if details else 0


if __name__ == "__main__":
    sys.exit(main())
