"""Peak resident memory of `moeplan quantize` and of `moeplan run` with int4/int8 experts, on the
Mixtral-shaped benchmark model (hidden 1024, intermediate 3584, 8 layers, 8 experts; bf16, 1.46 GB).

Issue 21's goals: `run` with int4 at most 1.3x the quantized checkpoint's size plus the interpreter;
`quantize` well under the bf16 size. Each command runs in its own process; its peak RSS is the kernel's
(`wait4` rusage, ru_maxrss). "The interpreter" is the peak RSS of a process that imports what `run`
imports (torch, transformers, the Mixtral modeling code, the runtime) and loads nothing.

    .venv/bin/python bench/quant_memory.py --out bench/results/quant_memory.md
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
MODEL_DIR = ROOT / "bench" / "models" / "mixtral-bench"
MOEPLAN = [sys.executable, "-m", "planner.cli"]
IMPORTS = ("import torch, transformers; from transformers.models.mixtral import modeling_mixtral; "
           "import runtime.session, runtime.quantize")


def measured(cmd: list[str]) -> tuple[int, float]:
    """Peak RSS (bytes) and seconds of `cmd`, measured by a fresh helper process that runs only it."""
    helper = ("import os, resource, subprocess, sys, time\n"
              "t = time.perf_counter()\n"
              "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
              "if r.returncode: sys.stderr.write(r.stderr.decode()[-3000:]); sys.exit(r.returncode)\n"
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, time.perf_counter() - t)\n")
    done = subprocess.run([sys.executable, "-c", helper, *cmd], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rss, seconds = done.stdout.split()
    return int(rss), float(seconds)


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def plan(folder: Path, work: Path, experts: str) -> Path:
    path = work / f"{experts}.yaml"
    path.write_text(yaml.safe_dump({
        "version": 2, "model": {"name": "mixtral-bench", "path": str(folder), "dtype": "bfloat16", "experts": experts},
        "hardware": {"accelerator": "cpu", "cpu_threads": 2}, "cache": {"slots": 0, "policy": "lru"},
        "miss": {"compute": "cpu"}}))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    if not (MODEL_DIR / "config.json").is_file():
        from predict_vs_measure import build_model

        build_model(MODEL_DIR)
    work = Path(tempfile.mkdtemp(prefix="quant-memory-"))
    rows = []
    try:
        interpreter, _ = measured([sys.executable, "-c", IMPORTS])
        bf16 = weights_bytes(MODEL_DIR)
        rows.append(("interpreter (imports of run, nothing loaded)", interpreter, None, None))
        run = ["run", "--max-new-tokens", str(args.tokens), "--json", "--prompt", "def main():"]
        rss, s = measured([*MOEPLAN, "run", str(plan(MODEL_DIR, work, "bfloat16")), *run[1:]])
        rows.append(("run bf16 experts (plain checkpoint)", rss, bf16, s))
        for fmt in ("int4", "int8"):
            out = work / f"mixtral-bench-{fmt}"
            rss, s = measured([*MOEPLAN, "quantize", str(MODEL_DIR), "--experts", fmt, "--out", str(out),
                               "--no-progress"])
            rows.append((f"quantize to {fmt}", rss, bf16, s))
            size = weights_bytes(out)
            rss, s = measured([*MOEPLAN, "run", str(plan(out, work, fmt)), *run[1:]])
            rows.append((f"run {fmt} (moeplan quantize checkpoint)", rss, size, s))
            rss, s = measured([*MOEPLAN, "run", str(plan(MODEL_DIR, work, fmt)), *run[1:]])
            rows.append((f"run {fmt} (plain checkpoint, quantized at load)", rss, bf16, s))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gb = 1e9
    lines = ["# Peak RSS of `moeplan quantize` and `moeplan run` with quantized experts", "",
             f"Date {datetime.now(timezone.utc).isoformat(timespec='seconds')}; {platform.machine()}, "
             f"{os.cpu_count()} vCPUs (shared with other jobs), Linux {platform.release()}. Model: the "
             f"Mixtral-shaped benchmark model (bench/predict_vs_measure.py `build_model`), bf16 weights "
             f"{bf16 / gb:.3f} GB. `run`: {args.tokens} new tokens, accelerator cpu, 2 threads, no slots.",
             "Command: `.venv/bin/python bench/quant_memory.py --out bench/results/quant_memory.md`.", "",
             "| command | peak RSS (GB) | weights read (GB) | peak - interpreter | (peak - interpreter) / weights | seconds |",
             "|---|---|---|---|---|---|"]
    for name, rss, weights, seconds in rows:
        if weights is None:
            lines.append(f"| {name} | {rss / gb:.3f} | | | | |")
            continue
        lines.append(f"| {name} | {rss / gb:.3f} | {weights / gb:.3f} | {(rss - interpreter) / gb:.3f} | "
                     f"{(rss - interpreter) / weights:.2f} | {seconds:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
