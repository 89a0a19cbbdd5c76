"""End-to-end, CPU only: moeplan's all-CPU plan against transformers' `generate` on the same weights.

Each engine runs in its own process (cold start, its own peak memory), in rotating order, `--repeats`
times; the table gives medians and the ratio to the fastest transformers experts implementation, all
measured side by side in one run. Greedy tokens are compared too (same weights, same dtype).

    .venv/bin/python bench/e2e_cpu.py --repeats 3 --tokens 32 --out bench/results/e2e_cpu_avx2.md

With --experts (say bfloat16,int8,int4) moeplan runs once per expert format (plan schema version 2, the
int formats quantized at load, group size 32), side by side; --gguf-also NAME=PATH adds llama.cpp on
another GGUF file of the same weights (say Q4_0=...q4_0.gguf), repeatable.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from predict_vs_measure import build_model  # noqa: E402  the shared benchmark checkpoint
from decode_args import add_decode_args  # noqa: E402
from report import cpu_line, emit  # noqa: E402

# moeplan's all-CPU plan; the engines compared run in their own processes
PLAN = """version: 1
model: {{name: mixtral-bench, dtype: {dtype}}}
hardware: {{accelerator: cpu, cpu_threads: {threads}}}
cache: {{slots: 0, policy: lru, preload: none}}
miss: {{compute: cpu, transfer_min_tokens: 0, promote: false}}
prefetch: {{lookahead: 0}}
"""
PLAN_V2 = PLAN.replace("version: 1", "version: 2").replace("dtype: {dtype}}}", "dtype: {dtype}, experts: {experts}}}")


def run_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_decode_args(ap, repeats=3)
    ap.add_argument("--impls", default="eager,batched_mm,grouped_mm")
    ap.add_argument("--out", default=None, help="write the Markdown table here")
    ap.add_argument("--llama-python", help="a Python with llama-cpp-python installed (bench/llama_cpp/README.md)")
    ap.add_argument("--gguf", help="the same checkpoint converted to GGUF in --dtype (bench/llama_cpp/convert_gguf.py)")
    ap.add_argument("--experts", default="", help="moeplan once per expert format, e.g. bfloat16,int8,int4")
    ap.add_argument("--gguf-also", action="append", default=[], metavar="NAME=PATH",
                    help="llama.cpp on another GGUF of the same weights (e.g. Q4_0=/path/q4_0.gguf), repeatable")
    ap.add_argument("--no-huge-pages", action="store_true",
                    help="also run moeplan with --no-huge-pages (its weights in 4 KB pages, as before 2026-11-29 "
                         "night; by default they are in 2 MB pages)")
    args = ap.parse_args()
    model = Path(args.model)
    if not (model / "config.json").exists():
        print(f"building the benchmark checkpoint in {model} ...", file=sys.stderr)
        build_model(model)
    ckpt_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    plan = Path(tempfile.mkdtemp()) / "all-cpu.yaml"
    plan.write_text(PLAN.format(dtype=args.dtype, threads=args.threads))
    engines = {"moeplan all-CPU": [str(ROOT / ".venv/bin/moeplan"), "run", str(plan), "--model", str(model),
                                   "--prompt", args.prompt, "--max-new-tokens", str(args.tokens), "--json"]}
    for fmt in filter(None, args.experts.split(",")):
        fmt_plan = plan.with_name(f"all-cpu-{fmt}.yaml")
        fmt_plan.write_text(PLAN_V2.format(dtype=args.dtype, threads=args.threads, experts=fmt))
        engines[f"moeplan all-CPU {fmt} experts"] = [str(ROOT / ".venv/bin/moeplan"), "run", str(fmt_plan), "--model",
                                                     str(model), "--prompt", args.prompt, "--max-new-tokens",
                                                     str(args.tokens), "--json"]
    if args.experts:
        del engines["moeplan all-CPU"]  # the bfloat16 entry of --experts is the same run
    if args.no_huge_pages:
        engines["moeplan all-CPU --no-huge-pages"] = engines["moeplan all-CPU"] + ["--no-huge-pages"]
    for impl in filter(None, args.impls.split(",")):
        engines[f"transformers {impl}"] = [sys.executable, str(ROOT / "bench/hf_generate.py"), "--model", str(model),
                                           "--impl", impl, "--dtype", args.dtype, "--threads", str(args.threads),
                                           "--tokens", str(args.tokens), "--prompt", args.prompt]
    if args.llama_python and args.gguf:
        engines[f"llama.cpp {args.dtype}"] = [args.llama_python, str(ROOT / "bench/llama_cpp/generate.py"),
                                             "--gguf", args.gguf, "--threads", str(args.threads),
                                             "--tokens", str(args.tokens), "--prompt", args.prompt]
    for extra in args.gguf_also:
        name, _, path = extra.partition("=")
        if args.llama_python and path:
            engines[f"llama.cpp {name}"] = [args.llama_python, str(ROOT / "bench/llama_cpp/generate.py"), "--gguf", path,
                                            "--threads", str(args.threads), "--tokens", str(args.tokens), "--prompt",
                                            args.prompt]
    results: dict[str, list[dict]] = {name: [] for name in engines}
    names = list(engines)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each repeat
            start = time.perf_counter()
            out = run_json(engines[name])
            out["wall_seconds"] = time.perf_counter() - start  # the whole process: start, load, generate
            results[name].append(out)
            print(f"repeat {r + 1}: {name}: {out['decode_tokens_per_s']:.2f} tokens/s", file=sys.stderr)

    rows = []
    for name, outs in results.items():
        rows.append((name, statistics.median(o["decode_tokens_per_s"] for o in outs),
                     statistics.median(o["prefill_seconds"] for o in outs),
                     max(o["peak_rss_bytes"] for o in outs), outs[0]["generated_ids"],
                     statistics.median(o["wall_seconds"] for o in outs)))
    best_hf = max((r for r in rows if r[0].startswith("transformers")), key=lambda r: r[1], default=None)
    ours = rows[0]
    lines = [f"# End-to-end CPU decode: moeplan vs transformers and llama.cpp ({args.dtype}, {args.threads} threads)", "",
             f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
             f"- machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} logical CPUs, "
             f"1-minute load average at the end {os.getloadavg()[0]:.2f}",
             cpu_line(),
             f"- model: {model.name}, checkpoint {ckpt_bytes / 1e9:.2f} GB, prompt {len(args.prompt)} chars, "
             f"{args.tokens} new tokens, {args.repeats} repeats (median)",
             f"- command: `.venv/bin/python bench/e2e_cpu.py {' '.join(sys.argv[1:])}`", "",
             "| engine | decode tokens/s | prefill s | process wall s (load included) | peak RSS GB | "
             "peak / checkpoint | same tokens as moeplan (where not: how many first ones agree) |",
             "|---|---|---|---|---|---|---|"]
    for name, tps, pre, rss, ids, wall in rows:
        lines.append(f"| {name} | {tps:.2f} | {pre:.2f} | {wall:.1f} | {rss / 1e9:.2f} | {rss / ckpt_bytes:.2f} | "
                     f"{_agreement(ids, ours[4])} |")
    lines.append("")
    for mine in (r for r in rows if r[0].startswith("moeplan")):
        if best_hf is not None:
            lines.append(f"{mine[0]} / fastest transformers ({best_hf[0]}): **{mine[1] / best_hf[1]:.2f}x** decode "
                         "tokens/s")
        if mine is not ours:
            paired = sorted(a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                            for a, b in zip(results[mine[0]], results[ours[0]]))
            lines.append(f"{mine[0]} / {ours[0]}: **{mine[1] / ours[1]:.2f}x** decode tokens/s; per repeat: median "
                         f"{statistics.median(paired):.2f}x, {paired[0]:.2f}-{paired[-1]:.2f}x")
        for name, tps, *_ in rows:
            if name.startswith("llama.cpp"):
                paired = sorted(a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                                for a, b in zip(results[mine[0]], results[name]))
                lines.append(f"{mine[0]} / {name}: **{mine[1] / tps:.2f}x** decode tokens/s; per repeat (the two "
                             f"run within a minute of each other): median {statistics.median(paired):.2f}x, "
                             f"{paired[0]:.2f}-{paired[-1]:.2f}x, moeplan faster in {sum(r > 1 for r in paired)} "
                             f"of {len(paired)}")
    return emit(lines, args.out)


def _agreement(ids: list[int], ours: list[int]) -> str:
    """'yes' for the same greedy tokens, else how many of the first ones agree: with the same weights, a
    different order of fp32 sums can turn a near-tie at one step, and every token after it differs."""
    if ids == ours:
        return "yes"
    same = next((i for i, (a, b) in enumerate(zip(ids, ours)) if a != b), min(len(ids), len(ours)))
    return f"no: the first {same} of {len(ours)}"


if __name__ == "__main__":
    sys.exit(main())
