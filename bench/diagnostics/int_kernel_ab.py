"""The int8/int4 kernels of a git revision against the working tree's, in one process, turns alternating
(--formats bfloat16,float32: the plain kernels of gemv.c, a few tokens).

Both kernel libraries are built from source (the revision's runtime/kernels/*.c and *.h through `git show`)
and called through the same GemvKernel wrapper on the same experts: a pool of --pool-gb of distinct experts
of the benchmark model's shape (hidden 1024, intermediate 3584, group 32, two experts per call through the
fused one-token path), cycled so that the reads come from DRAM, with scales as runtime/quant_format.py's
rule stores them (--any-scales: arbitrary float16 scales). Per repeat each side reads the whole pool once,
the order of the two sides alternating between repeats; reported: GB/s of codes + scales from the median
times, and the median of the repeats' time ratios (> 1: the working tree is faster). --tokens 2,8,64 times
the few-token path instead (`qmulti`: both experts' input projections in one call, then both output
projections, as the CPU executor calls it for a prefill chunk).

    .venv/bin/python bench/diagnostics/int_kernel_ab.py --rev a669fc4 --threads 1,2 --repeats 9
    .venv/bin/python bench/diagnostics/int_kernel_ab.py --rev a669fc4 --threads 1,2 --tokens 2,4,8,64
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from report import cpu_line  # noqa: E402
from runtime.kernels import (ISA_AVX2, ISA_AVX2_VNNI, SOURCES, GemvKernel, cpu_flags, instruction_sets,  # noqa: E402
                             int_instruction_set)
from runtime.quant_format import rule_scales  # noqa: E402


def build(sources: list[Path], out: Path) -> GemvKernel:
    subprocess.run(["cc", "-O3", "-fopenmp", "-shared", "-fPIC", *map(str, sources), "-o", str(out), "-lm"], check=True)
    flags, lib = cpu_flags(), ctypes.CDLL(str(out))
    int_isa = int_instruction_set(flags)
    if int_isa == ISA_AVX2_VNNI and not hasattr(lib, "qmoe_token_vnni"):  # a revision before qgemv_vnni.c
        int_isa = ISA_AVX2
    return GemvKernel(lib, instruction_sets(flags), int_isa=int_isa)


def revision_sources(rev: str, folder: Path) -> list[Path]:
    """The revision's kernel sources and headers, written into `folder`; its C sources, in build order."""
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:runtime/kernels"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        if name.endswith((".c", ".h")):
            text = subprocess.run(["git", "show", f"{rev}:runtime/kernels/{name}"], cwd=ROOT, check=True,
                                  capture_output=True).stdout
            (folder / name).write_bytes(text)
    qgemv = folder / "qgemv.c"
    if qgemv.exists() and b"qgemv_row_floats" not in qgemv.read_bytes():
        # revisions before the int4 byte planes: a one-token prepared input row took 2K floats, and
        # GemvKernel asks the library for that size
        qgemv.write_bytes(qgemv.read_bytes() + b"\nint64_t qgemv_row_floats(int64_t K) { return 2 * K; }\n")
    return [folder / p.name for p in SOURCES if (folder / p.name).exists()]


PLAIN = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def matrix(fmt: str, n: int, k: int, group: int, any_scales: bool, gen: torch.Generator):
    if fmt in PLAIN:
        return torch.randn(n, k, generator=gen).to(PLAIN[fmt])
    cols = k if fmt == "int8" else k // 2
    q = torch.randint(-127 if fmt == "int8" else 0, 128 if fmt == "int8" else 256, (n, cols), generator=gen,
                      dtype=torch.int8 if fmt == "int8" else torch.uint8)
    scales = torch.rand(n, k // group, generator=gen) * 2e-3 + 1e-4
    return q, (scales if any_scales else rule_scales(scales, fmt)).to(torch.float16)


def call(kernel: GemvKernel, experts: list, x: torch.Tensor, x_tokens: tuple[torch.Tensor, torch.Tensor],
         threads: int) -> None:
    """Two experts' product: the fused one-token path, or, for more tokens, both input projections in one
    qmulti call and both output projections in another."""
    if not isinstance(experts[0][0], tuple):  # bf16 / fp32 weights: gemv.c's multi (inputs in their dtype)
        kernel.multi([a for a, _ in experts], [x_tokens[0]] * len(experts), threads)
        kernel.multi([b for _, b in experts], [x_tokens[1]] * len(experts), threads)
        return
    if x_tokens[0].shape[0] == 1:
        kernel.qmoe_token([a for a, _ in experts], [b for _, b in experts], x, [0.5, 0.5], threads)
        return
    kernel.qmulti([a for a, _ in experts], [x_tokens[0]] * len(experts), threads)
    kernel.qmulti([b for _, b in experts], [x_tokens[1]] * len(experts), threads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the git revision whose kernels are the baseline")
    ap.add_argument("--formats", default="int8,int4")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--pool-gb", type=float, default=0.4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--any-scales", action="store_true")
    ap.add_argument("--tokens", default="1", help="tokens per call; more than 1 times qmulti")
    args = ap.parse_args()
    h, i, g = args.hidden, args.intermediate, args.group_size
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        base_dir.mkdir()
        kernels = {"base": build(revision_sources(args.rev, base_dir), Path(tmp) / "base.so"),
                   "tree": build(SOURCES, Path(tmp) / "tree.so")}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, h, generator=gen).to(torch.bfloat16)
    token_counts = [int(t) for t in args.tokens.split(",")]
    xs = {t: (torch.randn(t, h, generator=gen).to(torch.bfloat16), torch.randn(t, i, generator=gen).to(torch.bfloat16))
          for t in token_counts}
    print(cpu_line())
    print(f"base: {args.rev}; tree: the working tree; load average {os.getloadavg()[0]:.1f}; "
          f"{'arbitrary' if args.any_scales else 'rule'} scales; pool {args.pool_gb} GB; medians of {args.repeats}")
    print("| format | tokens | threads | base GB/s | tree GB/s | time base / tree |")
    print("|---|---|---|---|---|---|")
    for fmt in args.formats.split(","):
        per_call = 2 * 3 * h * i * (PLAIN[fmt].itemsize if fmt in PLAIN else (1 if fmt == "int8" else 0.5) + 2 / g)
        pool = [[(matrix(fmt, 2 * i, h, g, args.any_scales, gen), matrix(fmt, h, i, g, args.any_scales, gen))
                 for _ in range(2)] for _ in range(int(args.pool_gb * 1e9 // per_call) + 1)]
        dtype = PLAIN.get(fmt, torch.bfloat16)  # the int kernels take the model's (bf16) inputs
        inputs = {t: (a.to(dtype), b.to(dtype)) for t, (a, b) in xs.items()}  # converted once, untimed
        for tokens in token_counts:
            for threads in (int(t) for t in args.threads.split(",")):
                seconds: dict[str, list[float]] = {"base": [], "tree": []}
                for rep in range(args.repeats):
                    for name in ("base", "tree") if rep % 2 == 0 else ("tree", "base"):
                        start = time.perf_counter()
                        for experts in pool:
                            call(kernels[name], experts, x, inputs[tokens], threads)
                        seconds[name].append((time.perf_counter() - start) / len(pool))
                rate = {name: per_call / statistics.median(v) / 1e9 for name, v in seconds.items()}
                ratio = statistics.median(b / t for b, t in zip(seconds["base"], seconds["tree"]))
                print(f"| {fmt} | {tokens} | {threads} | {rate['base']:.2f} | {rate['tree']:.2f} | {ratio:.2f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
