"""The CPU expert kernel: weight bytes streamed per second against the DRAM read bandwidth.

For each dtype, thread count and token count: one whole expert (gate_up then down, with the gate
between) computed three ways: by the GEMV kernel forced at every token count it can run (all of a
layer's missed experts in one parallel region), by moeplan's executor as it chooses (the kernel where
its measured rule says it wins, torch otherwise), and by torch's matmul, cycling over a pool of experts
larger than the last-level cache so every byte comes from DRAM. The DRAM rate is torch's `sum()` over as
many experts' bytes. The four take turns within every repeat, each on the next experts of the pool, so
that the machine's drift falls on all of them alike; ratios are the median of each repeat's ratio. The
whole table is measured twice: with the weights in 4 KB pages and moved into 2 MB pages (where `moeplan
run` keeps them by default, runtime/huge_pages.py). Medians of --repeats.

With --int-formats (int8, int4: runtime/kernels/qgemv.c), a second table: a layer's missed experts of
each int format through the int kernel (one token: the fused path; more: the input projections, the gate,
the output projections), side by side with the bf16 kernel on the same shape, torch's dequantize-then-
matmul (what the executor does without the kernel) and the DRAM read of the int experts' bytes, all taking
turns within every repeat; GB/s counted in the bytes actually read (codes + float16 scales; bf16: 2 bytes
per weight). --int-only skips the float table.

    .venv/bin/python bench/cpu_kernel.py --out bench/results/cpu_kernel_avx2_run2.md
    .venv/bin/python bench/cpu_kernel.py --int-only --int-formats int8,int4 --tokens 1 \
        --out bench/results/cpu_kernel_int_avx2.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.cpu_executor import CpuExecutor  # noqa: E402
from runtime.expert_store import ExpertStore  # noqa: E402
from runtime.huge_pages import move_to_huge_pages, supported  # noqa: E402
from runtime.kernels import GemvKernel, load  # noqa: E402
from runtime.quant_format import rule_scales  # noqa: E402
from report import cpu_line, emit  # noqa: E402


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


def time_paths(paths: dict[str, Callable[[list[int]], object]], num_experts: int, per_call: int,
               repeats: int) -> dict[str, list[float]]:
    """Seconds of each path per repeat, the paths taking turns within each repeat, each turn on the next
    `per_call` experts of the pool (so every turn reads from DRAM): the machine's drift over the run falls on
    all paths alike, and a ratio can be taken repeat by repeat. The first round is a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    start = 0
    for r in range(repeats + 1):
        for name, path in paths.items():
            experts = [(start + j) % num_experts for j in range(per_call)]
            start += per_call
            t = time.perf_counter()
            path(experts)
            if r:
                times[name].append(time.perf_counter() - t)
    return times


def paired_ratio(fast: list[float], slow: list[float]) -> float:
    """The median over repeats of slow / fast seconds: how many times faster `fast` ran, turn against turn."""
    return statistics.median(b / a for a, b in zip(fast, slow))


def expert_paths(executors: dict[str, CpuExecutor], module: "Experts", store: ExpertStore, tokens: int,
                 per_call: int) -> dict[str, Callable[[list[int]], object]]:
    """Each executor computing a layer's missed experts on `tokens` tokens, and the DRAM read of their bytes."""
    hidden = module.gate_up_proj.shape[2]
    x = torch.randn(tokens, hidden, dtype=module.gate_up_proj.dtype)
    weights = torch.full((tokens, per_call), 1.0 / per_call)
    rows, ranks = torch.arange(tokens), [torch.full((tokens,), rank) for rank in range(per_call)]

    def run(executor: CpuExecutor) -> Callable[[list[int]], object]:
        def call(experts: list[int]) -> object:  # only the expert ids change from turn to turn
            return executor.run(module, store, x, weights, [(rows, ranks[r], e) for r, e in enumerate(experts)])
        return call

    paths: dict[str, Callable[[list[int]], object]] = {name: run(ex) for name, ex in executors.items()}
    paths["read"] = lambda experts: read_experts(module, experts)
    return paths


class IntExperts:
    """A pool of int8/int4 experts of one shape, stored as runtime/contracts/expert_format.py lays them out:
    per expert (qweight, scales) of the input projection [2I, H] and of the output projection [H, I]."""

    def __init__(self, fmt: str, num: int, hidden: int, inter: int, group: int, any_scales: bool = False) -> None:
        self.fmt, self.group, self.any_scales = fmt, group, any_scales
        gen = torch.Generator().manual_seed(0)
        first = [self._matrix(n, k, gen) for n, k in ((2 * inter, hidden), (hidden, inter))]
        # the same random values copied: every expert has its own memory, which is what the reads see
        self.experts = [first] + [[(q.clone(), s.clone()) for q, s in first] for _ in range(num - 1)]

    def _matrix(self, n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fmt == "int8":
            q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        else:
            q = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
        # scales as runtime/quant_format.py's rule stores them (the kernels' factored groups; --any-scales:
        # arbitrary float16 scales, the per-weight int8 and table int4 paths of other checkpoints)
        scales = torch.rand(n, k // self.group, generator=gen) * 2e-3 + 1e-4
        return q, (scales if self.any_scales else rule_scales(scales, self.fmt)).to(torch.float16)

    def expert_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.experts[0] for t in m)

    def dequantized(self, e: int, which: int, dtype: torch.dtype) -> torch.Tensor:
        """torch's dequantization of one matrix into the model dtype, as the executor's torch path does."""
        q, s = self.experts[e][which]
        if self.fmt == "int4":
            codes = torch.stack([q & 15, q >> 4], dim=-1).reshape(q.shape[0], -1)
            q = codes.to(torch.int8) - 8
        return (s.float().repeat_interleave(self.group, dim=1) * q.float()).to(dtype)


def read_int_experts(pool: IntExperts, experts: list[int]) -> None:
    """torch's sum() over the experts' codes and scales: the DRAM read of the bytes the kernel reads."""
    for e in experts:
        for q, s in pool.experts[e]:
            for t in (q, s):
                flat = t.reshape(-1)
                (flat.view(torch.float32) if flat.numel() * t.element_size() % 4 == 0 else flat.float()).sum()


def int_paths(kernel: GemvKernel, pool: IntExperts, bf16: Experts, tokens: int, threads: int,
              per_call: int) -> dict[str, Callable[[list[int]], object]]:
    """A layer's `per_call` missed experts on `tokens` tokens: int kernel, bf16 kernel on the same shape,
    torch's dequantize-then-matmul, and the DRAM read of the int bytes."""
    hidden = bf16.gate_up_proj.shape[2]
    x = torch.randn(tokens, hidden).to(torch.bfloat16)
    gates = [1.0 / per_call] * per_call

    def gate(h: torch.Tensor) -> torch.Tensor:
        g, u = h.chunk(2, dim=-1)
        return (torch.nn.functional.silu(g) * u).contiguous()

    def int_kernel(experts: list[int]) -> object:
        mats = [pool.experts[e] for e in experts]
        if tokens == 1:
            return kernel.qmoe_token([m[0] for m in mats], [m[1] for m in mats], x, gates, threads)
        h = kernel.qmulti([m[0] for m in mats], [x] * len(mats), threads, torch.bfloat16)
        return kernel.qmulti([m[1] for m in mats], [gate(y) for y in h], threads, torch.bfloat16)

    def bf16_kernel(experts: list[int]) -> object:
        w_in = [bf16.gate_up_proj[e % bf16.num_experts] for e in experts]
        w_out = [bf16.down_proj[e % bf16.num_experts] for e in experts]
        if tokens == 1:
            return kernel.moe_token(w_in, w_out, x, gates, threads)
        h = kernel.multi(w_in, [x] * len(w_in), threads, torch.bfloat16)
        return kernel.multi(w_out, [gate(y) for y in h], threads, torch.bfloat16)

    def torch_path(experts: list[int]) -> object:
        return [torch.nn.functional.linear(gate(torch.nn.functional.linear(x, pool.dequantized(e, 0, x.dtype))),
                                           pool.dequantized(e, 1, x.dtype)) for e in experts]

    return {"int": int_kernel, "bf16": bf16_kernel, "torch": torch_path,
            "read": lambda experts: read_int_experts(pool, experts)}


def int_table(args: argparse.Namespace, kernel: GemvKernel, threads: list[int], token_counts: list[int]) -> list[str]:
    if kernel.int_isa is None:
        raise SystemExit("the int kernels need AVX2, FMA and F16C")
    bf16_bytes = 3 * args.hidden * args.intermediate * 2
    bf16 = Experts(max(args.per_call * 2, int(args.pool_gb * 1e9 // bf16_bytes)), args.hidden, args.intermediate,
                   torch.bfloat16)
    lines = ["| format | threads | tokens | int kernel GB/s | DRAM read GB/s | int kernel / DRAM | bf16 kernel GB/s | "
             "time: bf16 kernel / int kernel | torch dequant+matmul GB/s | int kernel / torch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for fmt in args.int_formats.split(","):
        pool = IntExperts(fmt, 1, args.hidden, args.intermediate, args.group_size, args.any_scales)
        count = max(args.per_call * 2, int(args.pool_gb * 1e9 // pool.expert_bytes()))
        pool.experts += [[(q.clone(), s.clone()) for q, s in pool.experts[0]] for _ in range(count - 1)]
        moved, moved_bf16 = pool.expert_bytes() * args.per_call, bf16_bytes * args.per_call
        for t in threads:
            torch.set_num_threads(t)
            for tokens in token_counts:
                got = time_paths(int_paths(kernel, pool, bf16, tokens, t, args.per_call), len(pool.experts),
                                 args.per_call, args.repeats)
                rate = {name: moved / statistics.median(v) / 1e9 for name, v in got.items()}
                rate["bf16"] = moved_bf16 / statistics.median(got["bf16"]) / 1e9
                lines.append(f"| {fmt} | {t} | {tokens} | {rate['int']:.1f} | {rate['read']:.1f} | "
                             f"{paired_ratio(got['int'], got['read']):.2f} | {rate['bf16']:.1f} | "
                             f"{paired_ratio(got['int'], got['bf16']):.2f} | {rate['torch']:.2f} | "
                             f"{paired_ratio(got['int'], got['torch']):.1f} |")
                print(lines[-1], file=sys.stderr, flush=True)
        del pool
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096, help="Mixtral-8x7B's expert shape by default")
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--pool-gb", type=float, default=3.0, help="bytes of distinct experts cycled through")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", default="1,4,32")
    ap.add_argument("--per-call", type=int, default=2, help="missed experts per layer (top-k)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--int-formats", default="", help="int8,int4: the int kernels' table")
    ap.add_argument("--int-only", action="store_true", help="only the int kernels' table")
    ap.add_argument("--group-size", type=int, default=32, help="of the int experts")
    ap.add_argument("--any-scales", action="store_true",
                    help="int experts with arbitrary float16 scales, not the quantization rule's (the kernels' "
                         "per-weight int8 and table int4 paths)")
    ap.add_argument("--out")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    token_counts = [int(t) for t in args.tokens.split(",")]
    kernel = load()
    if kernel is None:
        raise SystemExit("the GEMV kernel is not available on this CPU (see runtime/kernels/__init__.py)")
    int_lines = int_table(args, kernel, threads, token_counts) if args.int_formats else []
    rows = []
    pages = ["4 KB", "2 MB"] if supported() else ["4 KB"]
    for dtype in () if args.int_only else (torch.bfloat16, torch.float32):
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
                    executors = {"moeplan": fast, "torch": plain}
                    if tokens <= kernel.max_tokens and kernel.supports(dtype):
                        executors["kernel"] = forced
                    got = time_paths(expert_paths(executors, module, store, tokens, args.per_call), module.num_experts,
                                     args.per_call, args.repeats)
                    moved = expert_bytes * args.per_call
                    rate = {name: moved / statistics.median(seconds) / 1e9 for name, seconds in got.items()}
                    forced_ratios = (paired_ratio(got["kernel"], got["read"]), paired_ratio(got["kernel"], got["torch"])) \
                        if "kernel" in got else None
                    rows.append((str(dtype).split(".")[1], page, t, tokens, rate.get("kernel"), rate["moeplan"],
                                 rate["torch"], rate["read"], forced_ratios, paired_ratio(got["moeplan"], got["torch"]),
                                 2 * moved / size * tokens / statistics.median(got["moeplan"]) / 1e9))
                    print(rows[-1], file=sys.stderr, flush=True)
            del store
        del module
    lines = ["# CPU expert kernel: weight bytes streamed per second", "",
             f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
             f"- machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} logical CPUs, torch "
             f"{torch.__version__}, load average at the end {os.getloadavg()[0]:.2f}",
             cpu_line(),
             f"- expert shape: hidden {args.hidden}, intermediate {args.intermediate} (gate, up, down), "
             f"{args.per_call} experts per call (one layer's misses), pool of {args.pool_gb} GB so reads come "
             f"from DRAM; medians of {args.repeats}",
             f"- command: `.venv/bin/python bench/cpu_kernel.py {' '.join(sys.argv[1:])}`", "",
             *(["## int8 / int4 experts (runtime/kernels/qgemv.c, AVX2 + FMA + F16C)", "",
                f"- group size {args.group_size}, "
                f"{'arbitrary float16 scales' if args.any_scales else 'scales as the quantization rule stores them'}; int kernel: one token the fused path, more the input projections, "
                "torch's gate, the output projections; bf16 kernel: the same on bf16 experts of the same shape; torch: "
                "each matrix dequantized into bf16 by torch, then its matmul; DRAM read: torch's sum() over the int "
                "experts' codes and scales; GB/s in the bytes each reads (int: codes + scales; bf16: 2 per weight); "
                "ratios of time, the median of the repeats' ratios", "", *int_lines, ""] if int_lines else []),
             f"- kernel instruction sets: { {str(d).split('.')[1]: i for d, i in kernel.isa_names().items()} }",
             "- kernel: the GEMV kernel forced; moeplan: the path the executor chooses; torch: torch's matmul; "
             "DRAM read: torch's sum() over as many experts' bytes; the four take turns in every repeat, each on "
             "other experts; GB/s from median times, ratios the median of the repeats' ratios; '-': above the "
             "kernel's token limit", "",
             "| dtype | pages | threads | tokens | kernel GB/s | moeplan GB/s | torch GB/s | DRAM read GB/s | "
             "kernel / DRAM | kernel / torch | moeplan / torch | moeplan GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if args.int_only:  # the float table's header goes with the float table
        lines = lines[:lines.index(f"- kernel instruction sets: { {str(d).split('.')[1]: i for d, i in kernel.isa_names().items()} }")]
    for dt, page, t, tok, forced_rate, fast, plain, d, forced_ratios, fast_ratio, flops in rows:
        if forced_ratios is not None:
            k_cols = (f"{forced_rate:.1f} | {fast:.1f} | {plain:.1f} | {d:.1f} | {forced_ratios[0]:.2f} | "
                      f"{forced_ratios[1]:.2f}")
        else:
            k_cols = f"- | {fast:.1f} | {plain:.1f} | {d:.1f} | - | -"
        lines.append(f"| {dt} | {page} | {t} | {tok} | {k_cols} | {fast_ratio:.2f} | {flops:.0f} |")
    return emit(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
