"""The demo's first prediction against its measurement: predicted and measured decode tokens/s of the plan
`bash scripts/demo.sh` tunes for the embedded model on this host, round after round.

    .venv/bin/python bench/demo_predict.py [--rounds 5] [--runs 3] [--threads N] [--out FILE]

Each round does what the demo does: `moeplan profile --quick --model models/tiny-moe`, `moeplan tune` with a
quarter of the experts' bytes as the budget (the demo's prompt, 48 new tokens), then `moeplan run --json`
`--runs` times with the demo's prompt; the prediction is `moeplan explain --json` of the plan on that
profile. `--threads N` sets the plan's CPU threads before it is explained and run (on a machine whose other
work keeps its cores busy, one thread gives numbers that describe the host; the demo's plan takes what
`tune` chose). Reports each round's prediction, the median of its runs, their ratio, and the median ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_line, emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "tiny-moe"
PROMPT = "def read_file(path):\n    with open("  # scripts/demo.sh's
NEW_TOKENS = 48


def moeplan(*args: str, json_out: bool = False) -> dict | None:
    cmd = [str(ROOT / ".venv" / "bin" / "moeplan"), *args, *(["--json"] if json_out else [])]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) if json_out else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3, help="`moeplan run` per round (their median counts)")
    parser.add_argument("--threads", type=int, help="the plan's CPU threads (default: what tune chose)")
    parser.add_argument("--out", help="also write the table to this file (markdown)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    prompt_tokens = len(AutoTokenizer.from_pretrained(MODEL)(PROMPT)["input_ids"])
    context = prompt_tokens + NEW_TOKENS // 2  # as scripts/demo.sh computes it
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for r in range(args.rounds):
            profile, plan = folder / f"profile-{r}.yaml", folder / f"plan-{r}.yaml"
            moeplan("profile", "--quick", "--model", str(MODEL), "--out", str(profile), "--no-progress")
            moeplan("tune", "--model", str(MODEL), "--profile", str(profile), "--expert-budget-fraction", "0.25",
                    "--trials", "60", "--context", str(context), "--prompt-tokens", str(prompt_tokens),
                    "--out", str(plan), "--no-progress")
            if args.threads:
                data = yaml.safe_load(plan.read_text())
                data["hardware"]["cpu_threads"] = args.threads
                plan.write_text(yaml.safe_dump(data, sort_keys=False))
            threads = yaml.safe_load(plan.read_text())["hardware"]["cpu_threads"]
            predicted = moeplan("explain", str(plan), "--profile", str(profile), "--context", str(context),
                                "--prompt-tokens", str(prompt_tokens), json_out=True)["decode_tokens_per_s"]
            runs = [moeplan("run", str(plan), "--model", str(MODEL), "--prompt", PROMPT, "--max-new-tokens",
                            str(NEW_TOKENS), json_out=True)["decode_tokens_per_s"] for _ in range(args.runs)]
            measured = statistics.median(runs)
            rows.append((r + 1, threads, predicted, runs, measured, predicted / measured))
            print(f"round {r + 1}: {threads} threads, predicted {predicted:.1f}, measured {measured:.1f} "
                  f"({', '.join(f'{x:.1f}' for x in runs)}), ratio {predicted / measured:.3f}", file=sys.stderr,
                  flush=True)
    lines = [f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Command: `.venv/bin/python "
             f"bench/demo_predict.py {' '.join(sys.argv[1:])}`. 1-minute load average {load_before:.1f} before, "
             f"{os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores).", "", cpu_line(), "",
             "| round | threads | predicted tok/s | measured tok/s (median; runs) | predicted / measured |",
             "|---|---|---|---|---|"]
    for r, threads, predicted, runs, measured, ratio in rows:
        lines.append(f"| {r} | {threads} | {predicted:.1f} | {measured:.1f} ({', '.join(f'{x:.1f}' for x in runs)}) "
                     f"| {ratio:.3f} |")
    ratios = [row[-1] for row in rows]
    lines += ["", f"Median predicted / measured: {statistics.median(ratios):.3f}; rounds within 15 %: "
              f"{sum(abs(x - 1) <= 0.15 for x in ratios)} of {len(ratios)}."]
    return emit(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
