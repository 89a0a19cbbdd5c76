"""Prefill of the working tree against a git revision, side by side: `moeplan run --max-new-tokens 1 --json`
of an all-CPU plan on the benchmark model, per expert format, each run a fresh process, the two sides
taking turns; reported: the median prefill seconds of each side and the median of the paired ratios.

    .venv/bin/python bench/diagnostics/prefill_ab.py --rev HEAD --experts bfloat16,int4 --repeats 5

The revision runs from a temporary `git worktree` (its own Python sources and C kernels, built on first
use) with this checkout's virtual environment. The prompt is the benchmark prompt repeated to at least
--prompt-tokens tokens: a prefill of 128 tokens sends each of the 8 experts about 32 (top-2), the
few-token kernels' range.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from ab_trees import run_once  # noqa: E402  `moeplan run --json` of one source tree, its own process
from e2e_cpu import PLAN_V2  # noqa: E402  the all-CPU plan the end-to-end benchmark runs
from predict_vs_measure import PROMPT, build_model  # noqa: E402

def prefill_seconds(tree: Path, plan: Path, model: Path, prompt: str) -> float:
    return float(run_once(tree, plan, model, 1, prompt)["prefill_seconds"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the git revision that is the baseline")
    ap.add_argument("--experts", default="bfloat16,int4")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default=str(ROOT / "bench/models/mixtral-bench"))
    args = ap.parse_args()
    model = Path(args.model)
    if not (model / "config.json").exists():
        build_model(model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt = PROMPT
    while len(tokenizer(prompt)["input_ids"]) < args.prompt_tokens:
        prompt += "\n" + PROMPT
    tokens = len(tokenizer(prompt)["input_ids"])
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.rev], cwd=ROOT, check=True)
        try:
            print(f"base: {args.rev}; tree: the working tree; prompt {tokens} tokens; {args.threads} threads; "
                  f"medians of {args.repeats}; load average {os.getloadavg()[0]:.1f}")
            print("| experts | base prefill s | tree prefill s | time base / tree |")
            print("|---|---|---|---|")
            for fmt in args.experts.split(","):
                plan = Path(tmp) / f"plan-{fmt}.yaml"
                plan.write_text(PLAN_V2.format(dtype="bfloat16", threads=args.threads, experts=fmt))
                seconds: dict[str, list[float]] = {"base": [], "tree": []}
                prefill_seconds(base, plan, model, prompt)  # each side builds its kernels once, untimed
                prefill_seconds(ROOT, plan, model, prompt)
                for rep in range(args.repeats):
                    for name in ("base", "tree") if rep % 2 == 0 else ("tree", "base"):
                        seconds[name].append(prefill_seconds(base if name == "base" else ROOT, plan, model, prompt))
                ratio = statistics.median(b / t for b, t in zip(seconds["base"], seconds["tree"]))
                print(f"| {fmt} | {statistics.median(seconds['base']):.3f} | {statistics.median(seconds['tree']):.3f} "
                      f"| {ratio:.2f} |", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
