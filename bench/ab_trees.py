"""Decode speed of one plan from two source trees, side by side: `moeplan run --json` from tree A, then tree B,
alternating (A B, B A, A B, ...) for `--repeats` pairs, each run its own process; medians and the B/A ratio.

For a change that must not slow a path down: tree A is the code before (say `git archive BASE | tar -x -C
DIR`), tree B the code after. Both trees run with the same Python, on the same checkpoint and plan.

    .venv/bin/python bench/ab_trees.py --tree-a DIR_BEFORE --tree-b . --model CHECKPOINT --plan PLAN \
        --tokens 32 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path


def run_once(tree: Path, plan: Path, model: Path, tokens: int, prompt: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "run", str(plan), "--model", str(model),
                           "--max-new-tokens", str(tokens), "--prompt", prompt, "--json"],
                          cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree-a", required=True, help="source tree before")
    ap.add_argument("--tree-b", required=True, help="source tree after")
    ap.add_argument("--model", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", default="def fibonacci(n):\n    if n < 2:\n        return n\n    return")
    args = ap.parse_args()
    trees = {"A": Path(args.tree_a).resolve(), "B": Path(args.tree_b).resolve()}
    plan, model = Path(args.plan).resolve(), Path(args.model).resolve()
    speeds: dict[str, list[float]] = {"A": [], "B": []}
    ids: dict[str, list[int]] = {}
    for i in range(args.repeats):
        for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
            result = run_once(trees[name], plan, model, args.tokens, args.prompt)
            speeds[name].append(result["decode_tokens_per_s"])
            ids.setdefault(name, result["generated_ids"])
            print(f"pair {i + 1} {name}: {speeds[name][-1]:.2f} tok/s", file=sys.stderr, flush=True)
    ratios = [b / a for a, b in zip(speeds["A"], speeds["B"])]
    med = {k: statistics.median(v) for k, v in speeds.items()}
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, plan {plan.name}, "
          f"{args.tokens} tokens, {args.repeats} pairs")
    print(f"A {trees['A']}: median {med['A']:.2f} tok/s  {[round(s, 2) for s in speeds['A']]}")
    print(f"B {trees['B']}: median {med['B']:.2f} tok/s  {[round(s, 2) for s in speeds['B']]}")
    print(f"B/A: median of paired ratios {statistics.median(ratios):.3f}; same tokens: {ids['A'] == ids['B']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
