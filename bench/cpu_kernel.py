"""The CPU expert kernel: weight bytes streamed per second against the DRAM read bandwidth.

For each dtype, thread count and token count: one whole expert (gate_up then down, with the gate
between) computed three ways: by the GEMV kernel forced at every token count it can run (all of a
layer's missed experts in one parallel region), by moeplan's executor as it chooses (the kernel where
its measured rule says it wins, torch otherwise), and by torch's matmul, cycling over a pool of experts larger than the last-level
cache so every byte comes from DRAM. The DRAM rate is torch's `sum()` over the same experts' bytes, timed
alternately with the forced kernel (each repeat: the kernel on some experts, the read on the next ones),
so that the ratio does not drift with the machine's load. The whole table is measured twice: with the
weights in 4 KB pages and moved into 2 MB pages (where `moeplan run` keeps them by default, runtime/huge_pages.py).
Medians of --repeats; ratios side by side.

    .venv/bin/python bench/cpu_kernel.py --out bench/results/cpu_kernel_avx2.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.cpu_executor import CpuExecutor  # noqa: E402
from runtime.expert_store import ExpertStore  # noqa: E402
from runtime.huge_pages import move_to_huge_pages, supported  # noqa: E402
from runtime.kernels import GemvKernel, load  # noqa: E402
from report import emit  # noqa: E402


class AlwaysKernel:
    """The kernel at every token count it can run, whatever its rule (GemvKernel.handles) would choose."""

    def __init__(self, kernel: GemvKernel) -> None:
        self.kernel = kernel

    def handles(self, dtype: torch.dtype, tokens: int, threads: int) -> bool:
        return self.kernel.supports(dtype) and tokens <= self.kernel.max_tokens

    def multi(self, weights: list[torch.Tensor], inputs: list[torch.Tensor], threads: int,
              out_dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        return self.kernel.multi(weights, inputs, threads, out_dtype)


class Experts(torch.nn.Module):
    """The layout of transformers' fused experts: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    has_gate, has_bias, is_transposed, has_post_expert_norm = True, False, False, False

    def __init__(self, num: int, hidden: int, inter: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_experts = num
        self.gate_up_proj = torch.nn.Parameter(torch.empty(num, 2 * inter, hidden, dtype=dtype).normal_(0, 0.02),
                                               requires_grad=False)
        self.down_proj = torch.nn.Parameter(torch.empty(num, hidden, inter, dtype=dtype).normal_(0, 0.02),
                                            requires_grad=False)

    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        g, u = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u


def read_experts(module: Experts, experts: list[int]) -> None:
    """torch's `sum()` over the experts' weight bytes (read as fp32 words): the DRAM read they cost."""
    for e in experts:
        for t in (module.gate_up_proj[e], module.down_proj[e]):
            t.reshape(-1).view(torch.float32).sum()


def time_expert(executor: CpuExecutor, module: Experts, store: ExpertStore, tokens: int, per_call: int,
                repeats: int, with_read: bool = False) -> tuple[float, float]:
    """Median seconds for `per_call` experts (the missed experts of one layer) on `tokens` tokens, and with
    `with_read` the median seconds of reading the next `per_call` experts' bytes, timed alternately."""
    hidden = module.gate_up_proj.shape[2]
    x = torch.randn(tokens, hidden, dtype=module.gate_up_proj.dtype)
    weights = torch.full((tokens, per_call), 1.0 / per_call)
    rank_of = torch.arange(per_call)
    times, reads, start = [], [], 0
    for r in range(repeats + 1):
        jobs = []
        for j in range(per_call):
            e = (start + j) % module.num_experts
            jobs.append((torch.arange(tokens), torch.full((tokens,), int(rank_of[j])), e))
        start += per_call
        t = time.perf_counter()
        executor.run(module, store, x, weights, jobs)
        if r:
            times.append(time.perf_counter() - t)
        if with_read:
            experts = [(start + j) % module.num_experts for j in range(per_call)]
            start += per_call
            t = time.perf_counter()
            read_experts(module, experts)
            if r:
                reads.append(time.perf_counter() - t)
    return statistics.median(times), statistics.median(reads) if reads else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096, help="Mixtral-8x7B's expert shape by default")
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--pool-gb", type=float, default=3.0, help="bytes of distinct experts cycled through")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", default="1,4,32")
    ap.add_argument("--per-call", type=int, default=2, help="missed experts per layer (top-k)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    token_counts = [int(t) for t in args.tokens.split(",")]
    kernel = load()
    if kernel is None:
        raise SystemExit("the GEMV kernel is not available on this CPU (see runtime/kernels/__init__.py)")
    rows = []
    pages = ["4 KB", "2 MB"] if supported() else ["4 KB"]
    for dtype in (torch.bfloat16, torch.float32):
        size = dtype.itemsize
        expert_bytes = 3 * args.hidden * args.intermediate * size
        num = max(args.per_call * 2, int(args.pool_gb * 1e9 // expert_bytes))
        module = Experts(num, args.hidden, args.intermediate, dtype)
        for page in pages:
            if page == "2 MB":
                move_to_huge_pages(list(module.parameters()))
            store = ExpertStore(module, 0, torch.device("cpu"))
            for t in threads:
                torch.set_num_threads(t)
                forced = CpuExecutor(t, kernel=AlwaysKernel(kernel))  # type: ignore[arg-type]
                fast, plain = CpuExecutor(t, kernel=kernel), CpuExecutor(t, use_kernel=False)
                for tokens in token_counts:
                    s_kernel, s_read = (time_expert(forced, module, store, tokens, args.per_call, args.repeats, True)
                                        if tokens <= kernel.max_tokens and kernel.supports(dtype)
                                        else (float("nan"), float("nan")))
                    s_fast = time_expert(fast, module, store, tokens, args.per_call, args.repeats)[0]
                    s_plain = time_expert(plain, module, store, tokens, args.per_call, args.repeats)[0]
                    moved = expert_bytes * args.per_call
                    rows.append((str(dtype).split(".")[1], page, t, tokens, moved / s_kernel / 1e9,
                                 moved / s_fast / 1e9, moved / s_plain / 1e9, moved / s_read / 1e9,
                                 2 * moved / size * tokens / s_fast / 1e9))
                    print(rows[-1], file=sys.stderr, flush=True)
            del store
        del module
    lines = ["# CPU expert kernel: weight bytes streamed per second", "",
             f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
             f"- machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} logical CPUs, torch "
             f"{torch.__version__}, load average at the end {os.getloadavg()[0]:.2f}",
             f"- expert shape: hidden {args.hidden}, intermediate {args.intermediate} (gate, up, down), "
             f"{args.per_call} experts per call (one layer's misses), pool of {args.pool_gb} GB so reads come "
             f"from DRAM; medians of {args.repeats}",
             f"- command: `.venv/bin/python bench/cpu_kernel.py {' '.join(sys.argv[1:])}`", "",
             f"- kernel instruction sets: { {str(d).split('.')[1]: i for d, i in kernel.isa_names().items()} }",
             "- kernel: the GEMV kernel forced; moeplan: the path the executor chooses; DRAM read: torch's sum() "
             "over the same experts' bytes, alternating with the kernel; '-': above the kernel's token limit", "",
             "| dtype | pages | threads | tokens | kernel GB/s | moeplan GB/s | torch GB/s | DRAM read GB/s | "
             "kernel / DRAM | kernel / torch | moeplan / torch | moeplan GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for dt, page, t, tok, forced_rate, fast, plain, d, flops in rows:
        if forced_rate == forced_rate:  # not NaN
            k_cols = (f"{forced_rate:.1f} | {fast:.1f} | {plain:.1f} | {d:.1f} | {forced_rate / d:.2f} | "
                      f"{forced_rate / plain:.2f}")
        else:
            k_cols = f"- | {fast:.1f} | {plain:.1f} | - | - | -"
        lines.append(f"| {dt} | {page} | {t} | {tok} | {k_cols} | {fast / plain:.2f} | {flops:.0f} |")
    return emit(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
