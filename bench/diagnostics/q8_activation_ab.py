"""Exact dequantization against llama.cpp's Q8 way, for the int kernels' choice: speed and difference.

The int kernels (runtime/kernels/qgemv.c) multiply exactly the reference's weights (bf16(float(scale) * q)
for a bf16 model) by the fp32 input. The alternative, llama.cpp's for its Q4_0/Q8_0 weights, quantizes the
input to int8 per block of 32 and sums integer products (bench/diagnostics/q8_activation.c). For one token
on one matrix of the Mixtral expert's input projection (28672 x 4096, group size 32), cycling over a pool
larger than the last-level cache: the rate of each in bytes read (codes + scales), the DRAM read of as many
bytes (torch's sum), taking turns within each repeat; and the difference of each from torch on the
dequantized bf16 weights, in units of the bf16 output's last place, and how many bf16 outputs differ.

    .venv/bin/python bench/diagnostics/q8_activation_ab.py --out bench/results/q8_activation_ab_avx2.md
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from runtime.kernels import load  # noqa: E402
from report import emit  # noqa: E402

GROUP = 32


def build() -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("no C compiler")
    target = Path(tempfile.mkdtemp()) / "q8.so"
    subprocess.run([compiler, "-O3", "-fopenmp", "-shared", "-fPIC", f"-I{ROOT / 'runtime/kernels'}",
                    str(ROOT / "bench/diagnostics/q8_activation.c"), "-o", str(target)], check=True)
    lib = ctypes.CDLL(str(target))
    lib.q8_gemv.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 6, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return lib


def quantize_input(x: torch.Tensor, int4: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [K] as llama.cpp's Q8 blocks of 32: int8 codes (int4 weights: even inputs then odd per block),
    scales absmax / 127, and each block's code sum."""
    blocks = x.float().reshape(-1, 32)
    dx = blocks.abs().amax(dim=1) / 127
    xq = torch.round(blocks / dx.clamp_min(1e-30)[:, None]).to(torch.int8)
    xsum = xq.int().sum(dim=1).to(torch.int32)
    if int4:
        xq = torch.cat([xq[:, 0::2], xq[:, 1::2]], dim=1)
    return xq.contiguous(), dx.contiguous(), xsum.contiguous()


def q8_reference(q: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the Q8 way computes, in torch (float64): the weights' codes times the quantized input."""
    blocks = x.float().reshape(-1, 32)
    dx = blocks.abs().amax(dim=1) / 127
    xq = torch.round(blocks / dx.clamp_min(1e-30)[:, None]).reshape(-1)
    xd = (xq.reshape(-1, 32) * dx[:, None]).reshape(-1).double()
    return (scales.double().repeat_interleave(GROUP, dim=1) * q.double()) @ xd


def matrices(fmt: str, n: int, k: int, count: int, gen: torch.Generator) -> list[tuple]:
    out = []
    for _ in range(count):
        lo, hi = (-127, 128) if fmt == "int8" else (-8, 8)
        q = torch.randint(lo, hi, (n, k), generator=gen, dtype=torch.int8)
        scales = (torch.rand(n, k // GROUP, generator=gen) * 2e-3 + 1e-4).to(torch.float16)
        if fmt == "int8":
            packed = q
        else:
            codes = (q + 8).to(torch.uint8)
            packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
        out.append((packed, scales, q))
    return out


def differences(kernel, lib, fmt: str, mat: tuple, x: torch.Tensor) -> dict[str, tuple[float, float]]:
    """For the exact kernel and the Q8 way: (median |difference| in bf16 last places of the reference's
    output, share of bf16 outputs unequal to torch's)."""
    packed, scales, q = mat
    w = (scales.float().repeat_interleave(GROUP, dim=1) * q.float()).to(torch.bfloat16)
    theirs = torch.nn.functional.linear(x, w).reshape(-1)  # torch on the dequantized weights, bf16 output
    ulp = theirs.float().abs().clamp_min(1e-30) * 2.0 ** -8
    exact = kernel.qmulti([(packed, scales)], [x], 1, out_dtype=torch.bfloat16)[0].reshape(-1)
    xq, dx, xsum = quantize_input(x.reshape(-1), fmt == "int4")
    y = torch.empty(q.shape[0], dtype=torch.float32)
    lib.q8_gemv(int(fmt == "int4"), packed.data_ptr(), scales.data_ptr(), xq.data_ptr(), dx.data_ptr(),
                xsum.data_ptr(), y.data_ptr(), q.shape[0], q.shape[1], 1)
    q8 = y.to(torch.bfloat16)
    simulated = q8_reference(q, scales, x.reshape(-1)).float()
    assert torch.allclose(y, simulated, rtol=1e-3, atol=1e-3 * simulated.abs().max().item()), "q8 diagnostic wrong"
    return {name: (((got.float() - theirs.float()).abs() / ulp).median().item(),
                   (got != theirs).float().mean().item()) for name, got in (("exact", exact), ("q8", q8))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=28672)
    ap.add_argument("--inputs", type=int, default=4096)
    ap.add_argument("--pool-gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out")
    args = ap.parse_args()
    kernel = load()
    if kernel is None or kernel.int_isa is None:
        raise SystemExit("the int kernels are not available on this CPU")
    lib = build()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, args.inputs, generator=gen).to(torch.bfloat16)
    rows = []
    diffs = {}
    for fmt in ("int8", "int4"):
        per = args.rows * (args.inputs if fmt == "int8" else args.inputs // 2) + 2 * args.rows * args.inputs // GROUP
        pool = matrices(fmt, args.rows, args.inputs, max(3, int(args.pool_gb * 1e9 // per)), gen)
        diffs[fmt] = differences(kernel, lib, fmt, pool[0], x)
        xq, dx, xsum = quantize_input(x.reshape(-1), fmt == "int4")
        y = torch.empty(args.rows, dtype=torch.float32)
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)

            def exact(m, threads=threads):
                kernel.qmulti([(m[0], m[1])], [x], threads)

            def q8(m, threads=threads):
                lib.q8_gemv(int(fmt == "int4"), m[0].data_ptr(), m[1].data_ptr(), xq.data_ptr(), dx.data_ptr(),
                            xsum.data_ptr(), y.data_ptr(), args.rows, args.inputs, threads)

            def read(m):
                m[0].view(-1).view(torch.float32).sum()
                m[1].view(-1).view(torch.float32).sum()

            times = {"exact": [], "q8": [], "read": []}
            turn = 0
            for rep in range(args.repeats + 1):
                for name, fn in (("exact", exact), ("q8", q8), ("read", read)):
                    m = pool[turn % len(pool)]
                    turn += 1
                    t = time.perf_counter()
                    fn(m)
                    if rep:
                        times[name].append(time.perf_counter() - t)
            rate = {name: per / statistics.median(v) / 1e9 for name, v in times.items()}
            speedup = statistics.median(e / q for e, q in zip(times["exact"], times["q8"]))
            rows.append((fmt, threads, rate["exact"], rate["q8"], rate["read"], speedup))
            print(rows[-1], file=sys.stderr, flush=True)
    lines = ["# int kernels: exact dequantization against llama.cpp's Q8 input quantization", "",
             f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
             f"- machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} logical CPUs, AVX2 + FMA + F16C, "
             f"load average at the end {os.getloadavg()[0]:.2f} (shared with three other sessions' work)",
             f"- command: `.venv/bin/python bench/diagnostics/q8_activation_ab.py {' '.join(sys.argv[1:])}`",
             f"- one matrix [{args.rows}, {args.inputs}], group size {GROUP}, one bf16 token, pool of "
             f"{args.pool_gb} GB; GB/s of codes + scales from median times of {args.repeats} turns; exact / q8: "
             "median of the turns' time ratios", "",
             "| format | threads | exact GB/s | Q8 GB/s | DRAM read GB/s | Q8 speed-up |", "|---|---|---|---|---|---|"]
    lines += [f"| {f} | {t} | {e:.1f} | {q:.1f} | {r:.1f} | {s:.2f} |" for f, t, e, q, r, s in rows]
    lines += ["", "Difference from torch on the dequantized bf16 weights (bf16 outputs): median |difference| in "
              "last places of the reference's output, and the share of outputs not equal to torch's:", "",
              "| format | exact: median ulps | exact: unequal | Q8: median ulps | Q8: unequal |", "|---|---|---|---|---|"]
    for fmt, d in diffs.items():
        lines.append(f"| {fmt} | {d['exact'][0]:.3f} | {100 * d['exact'][1]:.2f} % | {d['q8'][0]:.3f} | "
                     f"{100 * d['q8'][1]:.2f} % |")
    return emit(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
