"""Where a CPU decode token's time goes: the CPU kernel (weights streamed) against everything else.

Loads the benchmark checkpoint with the all-CPU plan in this process, times every call into the CPU
kernel (`GemvKernel.linear`, `.multi`, `.moe_token`, and the one-token calls `.one_token` binds) during
decode, and reports per token: the kernel's milliseconds and weight bytes (so its GB/s), and the rest
(transformers' modeling code, moeplan's bookkeeping, sampling). Stand-ins for the kernel, in the same
process, alternating with the real thing repeat by repeat (`--stand-ins`):
- zeros: each call returns zeros at once; what remains is the Python and torch overhead run back to back;
- sleep: each call sleeps as long as the real kernel takes for its bytes (at the rate measured so far),
  then returns zeros; nothing is streamed, yet the code between the calls runs after the same pauses;
- spin, reread, read (bench/diagnostics/decode_standins.c, built here): the kernel's threads busy for as
  long as the kernel takes, on registers only, re-reading a 4 MB buffer, or reading the call's weights
  plainly (one stream per thread, no prefetch hint), then zeros;
- read4: the call's weights read with the kernel's own access pattern and prefetches, without its arithmetic
  (four streams per thread): what the kernel's calls would take if they were bound by memory alone.
Comparing the rest across them tells how much of it grows with the time spent outside the interpreter
and how much with what the pause does to the caches. Medians of --repeats generations.

    .venv/bin/python bench/diagnostics/decode_breakdown.py --out bench/results/decode_breakdown_avx2_run2.md
"""
from __future__ import annotations

import argparse
import ctypes
import math
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import runtime.kernels as kernels  # noqa: E402
from e2e_cpu import PLAN_V2  # noqa: E402  the same all-CPU plan as the end-to-end benchmark
from predict_vs_measure import build_model  # noqa: E402
from decode_args import add_decode_args  # noqa: E402
from report import cpu_line, emit  # noqa: E402
from runtime.huge_pages import request_for_new_tensors  # noqa: E402
from runtime.plan import Plan  # noqa: E402
from runtime.session import Session  # noqa: E402


class KernelClock:
    """Wraps the kernel's entry points: seconds, calls and weight bytes; `stand_in` says what a call does:
    "kernel" (the real one), "zeros" (returns zeros) or "sleep" (sleeps bytes / `sleep_gbps`, then zeros)."""

    def __init__(self, threads: int, standins: ctypes.CDLL | None = None) -> None:
        self.seconds, self.calls, self.bytes = 0.0, 0, 0
        self.int_seconds, self.int_bytes = 0.0, 0  # the int experts' calls among them (qmulti, qmoe_token)
        # the calling thread's CPU time inside the calls (bench/decode_split.py: on a busy machine the
        # main thread's CPU time outside them is a steadier measure of the Python than the wall clock)
        self.cpu_seconds = 0.0
        self._cpu_start = 0.0
        self.stand_in, self.sleep_gbps = "kernel", 0.0
        self.threads, self.standins = threads, standins
        self._resident = torch.ones(1 << 20, dtype=torch.int32)  # 4 MB: stays in a server CPU's L3
        linear = kernels.GemvKernel.linear
        clock = self

        def timed_multi(multi, int_call: bool):  # multi or qmulti (weights: tensors or (codes, scales) pairs)
            def run(kernel, weights, inputs, threads, out_dtype=torch.float32):
                start = clock.start()
                if clock.stands_in(weights):
                    out = [torch.zeros(x.shape[0], _tensors([w])[0].shape[0], dtype=out_dtype)
                           for w, x in zip(weights, inputs)]
                else:
                    out = multi(kernel, weights, inputs, threads, out_dtype)
                clock.add(time.perf_counter() - start, weights, int_call)
                return out
            return run

        def timed_token(token, int_call: bool):  # moe_token or qmoe_token
            def run(kernel, w_in, w_out, x, gates, threads):
                start = clock.start()
                out = torch.zeros_like(x) if clock.stands_in(w_in + w_out) else token(kernel, w_in, w_out, x, gates,
                                                                                      threads)
                clock.add(time.perf_counter() - start, w_in + w_out, int_call)
                return out
            return run

        def timed_linear(kernel, weight, x, threads, out_dtype):
            start = clock.start()
            out = torch.zeros(x.shape[0], weight.shape[0], dtype=out_dtype) if clock.stands_in([weight]) else \
                linear(kernel, weight, x, threads, out_dtype)
            clock.add(time.perf_counter() - start, [weight])
            return out

        one_token = kernels.GemvKernel.one_token

        def timed_one_token(kernel, weight):  # the dense projections bind their calls at load
            call = one_token(kernel, weight)

            def timed_call(x, out, threads):
                start = clock.start()
                if clock.stands_in([weight]):
                    out.zero_()
                else:
                    call(x, out, threads)
                clock.add(time.perf_counter() - start, [weight])
            return timed_call

        k = kernels.GemvKernel
        k.multi, k.moe_token = timed_multi(k.multi, False), timed_token(k.moe_token, False)
        k.qmulti, k.qmoe_token = timed_multi(k.qmulti, True), timed_token(k.qmoe_token, True)
        k.linear, k.one_token = timed_linear, timed_one_token

    def stands_in(self, weights: list) -> bool:
        """Whether a stand-in replaces this call (returning zeros); the pausing ones pause here first, as
        long as the kernel takes for these bytes at the rate measured so far."""
        stand_in = self.stand_in
        if stand_in in ("kernel", "zeros"):
            return stand_in == "zeros"
        seconds = _nbytes(weights) / (self.sleep_gbps * 1e9)
        if stand_in == "sleep":
            time.sleep(seconds)
        elif stand_in == "spin":
            self.standins.standin_spin(seconds, self.threads)
        elif stand_in == "reread":
            self.standins.standin_reread(self._resident.data_ptr(), self._resident.numel(), seconds, self.threads)
        else:  # read, read4: the weights themselves
            read = self.standins.standin_read if stand_in == "read" else self.standins.standin_read4
            for w in _tensors(weights):
                read(w.data_ptr(), _nbytes([w]) // 4, self.threads)
        return True

    def start(self) -> float:
        """The wall clock at a call's start (and the thread's CPU clock, kept for `add`)."""
        self._cpu_start = time.thread_time()
        return time.perf_counter()

    def add(self, seconds: float, weights: list, int_call: bool = False) -> None:
        self.cpu_seconds += time.thread_time() - self._cpu_start
        self.seconds += seconds
        self.calls += 1
        self.bytes += _nbytes(weights)
        if int_call:
            self.int_seconds += seconds
            self.int_bytes += _nbytes(weights)


    def reset(self) -> tuple[float, int, int, float, int]:
        """(seconds, calls, bytes) of every call since the last reset, then (seconds, bytes) of the int ones."""
        out = (self.seconds, self.calls, self.bytes, self.int_seconds, self.int_bytes)
        self.seconds, self.calls, self.bytes = 0.0, 0, 0
        self.int_seconds, self.int_bytes = 0.0, 0
        return out

    def take_cpu(self) -> float:
        """The calling thread's CPU seconds inside kernel calls since the last take."""
        out, self.cpu_seconds = self.cpu_seconds, 0.0
        return out


def _tensors(weights: list) -> list:
    """The weight tensors of a call: an int matrix is a (codes, scales) pair, read as both."""
    return [t for w in weights for t in (w if isinstance(w, tuple) else (w,))]


def _nbytes(weights: list) -> int:
    """Bytes of weight tensors (an int matrix's codes and scales), or of anything with a shape and dtype (a
    q/k/v group's stacked rows)."""
    return sum(math.prod(w.shape) * w.dtype.itemsize for w in _tensors(weights))


ROW_NAMES = {"kernel": "weights streamed", "sleep": "a sleep as long as the kernel instead (nothing streamed)",
             "zeros": "zeros instead of weights (back to back)",
             "spin": "arithmetic on the kernel's threads as long as the kernel (no memory)",
             "reread": "re-reading a 4 MB buffer as long as the kernel (cache-resident)",
             "read": "a plain read of the same weights (one stream per thread, no prefetch hint)",
             "read4": "the kernel's reads of the same weights without its arithmetic (four streams per thread)"}
NEEDS_STANDINS = ("spin", "reread", "read", "read4")


def build_standins() -> ctypes.CDLL:
    """bench/diagnostics/decode_standins.c compiled into a temporary folder, as runtime/kernels builds its own."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("no C compiler: the spin, reread and read stand-ins cannot be built")
    target = Path(tempfile.mkdtemp()) / "standins.so"
    subprocess.run([compiler, "-O3", "-mavx2", "-fopenmp", "-shared", "-fPIC", f"-I{ROOT / 'runtime/kernels'}",
                    str(ROOT / "bench/diagnostics/decode_standins.c"), "-o", str(target)], check=True)
    lib = ctypes.CDLL(str(target))
    lib.standin_spin.argtypes = [ctypes.c_double, ctypes.c_int]
    lib.standin_spin.restype = ctypes.c_double
    lib.standin_reread.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int]
    lib.standin_read.argtypes = lib.standin_read4.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return lib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_decode_args(ap, repeats=5)
    ap.add_argument("--no-huge-pages", action="store_true", help="load as `moeplan run --no-huge-pages` does")
    ap.add_argument("--stand-ins", default="zeros,sleep",
                    help=f"comma-separated, run after the real kernel each repeat: {', '.join(list(ROW_NAMES)[1:])}")
    ap.add_argument("--experts", choices=["int8", "int4"],
                    help="the plan's expert format, quantized at load (default: --dtype); int bytes: codes and scales")
    ap.add_argument("--out")
    args = ap.parse_args()
    args.experts = args.experts or args.dtype
    variants = ["kernel"] + [v for v in args.stand_ins.split(",") if v]
    unknown = [v for v in variants if v not in ROW_NAMES]
    if unknown:
        raise SystemExit(f"--stand-ins: unknown {', '.join(unknown)}; choose from {', '.join(list(ROW_NAMES)[1:])}")
    request_for_new_tensors(not args.no_huge_pages)  # as the command line does, before torch allocates
    model = Path(args.model)
    if not (model / "config.json").exists():
        build_model(model)
    if kernels.load() is None:
        raise SystemExit("the CPU kernel is not available here: nothing to break down")
    plan = Path(tempfile.mkdtemp()) / "all-cpu.yaml"
    plan.write_text(PLAN_V2.format(dtype=args.dtype, threads=args.threads, experts=args.experts))
    standins = build_standins() if any(v in NEEDS_STANDINS for v in variants) else None
    clock = KernelClock(args.threads, standins)  # before the load: the dense projections bind their kernel calls then
    session = Session.load(Plan.load(plan), model_dir=model, huge_pages=False if args.no_huge_pages else None)
    session.generate(args.prompt, max_new_tokens=4)  # warm-up
    samples: dict[str, dict[str, list[float]]] = {m: {"token": [], "kernel": [], "gbps": [], "int": []}
                                                  for m in variants}
    int_moved = 0
    moved = decoded = calls = 0
    for repeat in range(args.repeats):
        for stand_in in variants:  # the kernel first: the pausing stand-ins take its rate so far
            clock.stand_in = stand_in
            clock.sleep_gbps = statistics.median(samples["kernel"]["gbps"]) if samples["kernel"]["gbps"] else 0.0
            clock.reset()
            session.generate(args.prompt, max_new_tokens=1)  # the prefill alone, to subtract
            pre_s, pre_calls, pre_bytes, pre_int_s, pre_int_bytes = clock.reset()
            result = session.generate(args.prompt, max_new_tokens=args.tokens + 1)
            s, calls, moved, int_s, int_moved = clock.reset()
            s, moved, calls = s - pre_s, moved - pre_bytes, calls - pre_calls
            int_s, int_moved = int_s - pre_int_s, int_moved - pre_int_bytes
            decoded = len(result.generated_ids) - 1
            got = samples[stand_in]
            got["token"].append(result.decode_seconds / decoded * 1e3)
            got["kernel"].append(s / decoded * 1e3)
            got["gbps"].append(moved / s / 1e9 if s > 0 else 0.0)
            got["int"].append(int_s / decoded * 1e3)
        print(f"repeat {repeat + 1}: " + ", ".join(f"{m} {samples[m]['token'][-1]:.1f} ms" for m in variants),
              file=sys.stderr, flush=True)
    rows = [(stand_in, statistics.median(got["token"]), statistics.median(got["kernel"]),
             statistics.median(got["gbps"]), moved / decoded / 1e6, calls / decoded, statistics.median(got["int"]))
            for stand_in, got in samples.items()]
    with_int = int_moved > 0
    in_huge = session.engine.huge_page_bytes
    pages = f"{in_huge / 1e9:.2f} GB of weights in 2 MB pages" if in_huge else "4 KB pages"
    lines = [f"# Where a CPU decode token's time goes ({args.dtype}, {args.experts} experts, {args.threads} threads, "
             f"{pages})", "",
             f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
             f"- machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} logical CPUs, "
             f"load average at the end {os.getloadavg()[0]:.2f}",
             cpu_line(),
             f"- model: {model.name}, all-CPU plan, {args.tokens} decode tokens, medians of {args.repeats}",
             f"- command: `.venv/bin/python bench/diagnostics/decode_breakdown.py {' '.join(sys.argv[1:])}`", "",
             "| kernel calls | ms per token | kernel (or stand-in) ms | kernel GB/s | everything else ms | "
             "weight MB per token | kernel calls per token |" + (" int experts' calls ms |" if with_int else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if with_int else "")]
    for stand_in, total, k, rate, mb, calls, int_ms in rows:
        rate_text = f"{rate:.1f}" if stand_in == "kernel" else "-"
        lines.append(f"| {ROW_NAMES[stand_in]} | {total:.1f} | {k:.1f} | {rate_text} | {total - k:.1f} | {mb:.0f} | "
                     f"{calls:.0f} |" + (f" {int_ms:.2f} |" if with_int else ""))
    if with_int:
        lines += ["", f"- the int experts' calls: {int_moved / decoded / 1e6:.0f} MB per token (codes and scales), "
                  f"the kernel at {int_moved / decoded / statistics.median(samples['kernel']['int']) / 1e6:.1f} GB/s"]
    for stand_in in ("read", "read4"):  # the kernel against reads of the same bytes, repeat by repeat
        if stand_in not in samples:
            continue
        ratios = {part: [r / k for k, r in zip(samples["kernel"][part], samples[stand_in][part]) if k > 0]
                  for part in ("kernel", "int")}
        text = f"all calls {statistics.median(ratios['kernel']):.3f}"
        if with_int:
            text += f", the int experts' calls {statistics.median(ratios['int']):.3f}"
        lines.append(f"- {ROW_NAMES[stand_in]} / the kernel, time (median of the repeats' ratios): {text}")
    return emit(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
