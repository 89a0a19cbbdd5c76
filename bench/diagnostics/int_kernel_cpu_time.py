"""The int kernels' arithmetic cost: CPU seconds of the calling thread per layer call, one thread.

On a machine shared with other work, wall-clock rates of a compute-bound kernel say more about the
neighbours than about the kernel; the thread's own CPU time does not (it still includes the cycles lost to
a busy SMT sibling). For one layer's two missed experts of the benchmark model's shape (hidden 1024,
intermediate 3584, group size 32) through the fused one-token path: int8, int4 and the bf16 kernel,
taking turns, medians of --repeats, each of --calls calls on the same experts (they stay in the last-level
cache: this is the arithmetic's rate, not DRAM's). Weights per CPU-second, and what that is in bytes of
each format: the most one thread can stream whatever the memory does.

    .venv/bin/python bench/diagnostics/int_kernel_cpu_time.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from runtime.kernels import load  # noqa: E402
from runtime.quant_format import rule_scales  # noqa: E402


def matrix(fmt: str, n: int, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    cols = k if fmt == "int8" else k // 2
    q = torch.randint(0, 100, (n, cols), dtype=torch.int8 if fmt == "int8" else torch.uint8)
    # scales as runtime/quant_format.py's rule stores them: the kernels' factored groups
    return q, rule_scales(torch.rand(n, k // group) * 0.01 + 1e-4, fmt).to(torch.float16)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    kernel = load()
    if kernel is None or kernel.int_isa is None:
        raise SystemExit("the int kernels are not available on this CPU")
    h, i, g = args.hidden, args.intermediate, args.group_size
    experts = {fmt: [(matrix(fmt, 2 * i, h, g), matrix(fmt, h, i, g)) for _ in range(2)] for fmt in ("int8", "int4")}
    bf16 = [(torch.randn(2 * i, h).to(torch.bfloat16), torch.randn(h, i).to(torch.bfloat16)) for _ in range(2)]
    x = torch.randn(1, h).to(torch.bfloat16)
    calls = {fmt: (lambda e=e: kernel.qmoe_token([a for a, _ in e], [b for _, b in e], x, [0.5, 0.5], 1))
             for fmt, e in experts.items()}
    calls["bf16"] = lambda: kernel.moe_token([a for a, _ in bf16], [b for _, b in bf16], x, [0.5, 0.5], 1)
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            t = time.thread_time()
            for _ in range(args.calls):
                call()
            seconds[name].append((time.thread_time() - t) / args.calls)
    weights = 2 * 3 * h * i
    bytes_per_weight = {"int8": 1 + 2 / g, "int4": 0.5 + 2 / g, "bf16": 2.0}
    print("| path | CPU ms per layer call | G weights per CPU-second | GB/s of its format per thread |")
    print("|---|---|---|---|")
    for name, v in seconds.items():
        rate = weights / statistics.median(v) / 1e9
        print(f"| {name} | {1e3 * statistics.median(v):.2f} | {rate:.2f} | {rate * bytes_per_weight[name]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
