"""A CPU decode token's split, kernel against everything else, with the native decode step on and off.

Loads the benchmark checkpoint with the all-CPU plan once and, repeat by repeat in rotating order,
generates `--tokens` decode tokens four ways: the native decode step (runtime/native_decode.py) on or off,
each with the real GEMV kernel and with the kernel returning zeros at once (what the rest costs back to
back). Every call into the GEMV kernel is timed (bench/diagnostics/decode_breakdown.py's KernelClock), so
"everything else" is the token's time less the kernel's: transformers' modeling code or the native
step, moeplan's MoE bookkeeping, the C attention and norms, sampling. Reports the medians of each cell,
the median of the per-repeat ratios on/off (paired: both measured in the same repeat), and whether on
and off generated the same tokens. Beside the wall clock, the main thread's CPU time outside the kernel
calls (time.thread_time): on a machine shared with other work the wall clock also counts the time the
process waited for a CPU, the CPU time does not (it still counts a thread pool's spin-waits).

    .venv/bin/python bench/decode_split.py --repeats 7 --out bench/results/decode_split_avx2.md
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "diagnostics"))

import runtime.kernels as kernels  # noqa: E402
from decode_breakdown import KernelClock  # noqa: E402  times every GEMV kernel entry point
from e2e_cpu import PLAN  # noqa: E402  the same all-CPU plan as the end-to-end benchmark
from predict_vs_measure import build_model  # noqa: E402
from decode_args import add_decode_args  # noqa: E402
from report import emit  # noqa: E402
from runtime.huge_pages import request_for_new_tensors  # noqa: E402
from runtime.plan import Plan  # noqa: E402
from runtime.session import Session  # noqa: E402

MODES = [("off", "kernel"), ("on", "kernel"), ("off", "zeros"), ("on", "zeros")]


def measure(session: Session, clock: KernelClock, prompt: str, tokens: int) -> tuple[float, float, float, list[int]]:
    """(ms per decode token, kernel ms per decode token, the main thread's CPU ms per decode token outside the
    kernel calls, generated ids), counted from the first token (the prefill's) to the last."""
    marks: dict[str, tuple[float, float]] = {}

    def on_token(step: int, _: int) -> None:
        now = (time.perf_counter(), time.thread_time())
        if step == 0:  # the prefill is done: count from here
            clock.reset()
            clock.take_cpu()
            marks["start"] = now
        marks["end"] = now

    result = session.generate(prompt, max_new_tokens=tokens + 1, on_token=on_token)
    kernel_s, _, _ = clock.reset()
    kernel_cpu = clock.take_cpu()
    decoded = len(result.generated_ids) - 1
    wall = marks["end"][0] - marks["start"][0]
    cpu = marks["end"][1] - marks["start"][1] - kernel_cpu
    return wall / decoded * 1e3, kernel_s / decoded * 1e3, cpu / decoded * 1e3, result.generated_ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_decode_args(ap, repeats=5)
    ap.add_argument("--note", default="", help="a line for the report (say, how busy the machine was)")
    ap.add_argument("--out")
    args = ap.parse_args()
    request_for_new_tensors(True)  # as the command line does, before torch allocates
    model = Path(args.model)
    if not (model / "config.json").exists():
        build_model(model)
    if kernels.load() is None:
        raise SystemExit("the CPU kernel is not available here: nothing to split")
    plan = Path(tempfile.mkdtemp()) / "all-cpu.yaml"
    plan.write_text(PLAN.format(dtype=args.dtype, threads=args.threads))
    clock = KernelClock(args.threads)  # before the load: the dense projections bind their kernel calls then
    session = Session.load(Plan.load(plan), model_dir=model)
    native = session.engine.native
    if native is None:
        raise SystemExit("the native decode step does not run this model here (see the debug log)")
    session.generate(args.prompt, max_new_tokens=4)  # warm-up
    cells: dict[tuple[str, str], dict[str, list[float]]] = {m: {"token": [], "kernel": [], "cpu": []} for m in MODES}
    ratios: dict[str, list[float]] = {"kernel": [], "zeros": []}
    same_tokens = True
    for repeat in range(args.repeats):
        order = MODES[repeat % len(MODES):] + MODES[:repeat % len(MODES)]  # rotate who goes first
        ids: dict[str, list[int]] = {}
        for step, stand_in in order:
            native.enabled = step == "on"
            clock.stand_in = stand_in
            token_ms, kernel_ms, cpu_ms, generated = measure(session, clock, args.prompt, args.tokens)
            cells[(step, stand_in)]["token"].append(token_ms)
            cells[(step, stand_in)]["kernel"].append(kernel_ms)
            cells[(step, stand_in)]["cpu"].append(cpu_ms)
            if stand_in == "kernel":
                ids[step] = generated
        same_tokens &= ids["on"] == ids["off"]
        for stand_in in ratios:
            off, on = cells[("off", stand_in)], cells[("on", stand_in)]
            ratios[stand_in].append((on["token"][-1] - on["kernel"][-1]) / (off["token"][-1] - off["kernel"][-1]))
        print(f"repeat {repeat + 1}: " + ", ".join(
            f"{s}/{k} {cells[(s, k)]['token'][-1]:.1f} ms" for s, k in MODES), file=sys.stderr, flush=True)
    native.enabled = True
    isa = {str(d).split('.')[1]: n for d, n in kernels.load().isa_names().items()}
    lines = [f"# A CPU decode token's split with the native decode step on and off ({args.dtype}, {args.threads} threads)",
             "", f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
             f"- machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} logical CPUs, kernel {isa}, "
             f"load average at the end {os.getloadavg()[0]:.2f}",
             f"- model: {model.name}, all-CPU plan, {args.tokens} decode tokens per generation, medians of "
             f"{args.repeats} repeats, the four ways in rotating order within each repeat",
             f"- command: `.venv/bin/python bench/decode_split.py {shlex.join(sys.argv[1:])}`",
             f"- same tokens with the step on and off: {'yes' if same_tokens else 'NO'}"]
    if args.note:
        lines.append(f"- note: {args.note}")
    lines += ["", "| native decode step | GEMV kernel | ms per token | kernel ms | everything else ms | "
              "everything else, main thread's CPU ms |", "|---|---|---|---|---|---|"]
    for step, stand_in in MODES:
        got = cells[(step, stand_in)]
        rest = [t - k for t, k in zip(got["token"], got["kernel"])]
        kernel = "weights streamed" if stand_in == "kernel" else "returns zeros (back to back)"
        lines.append(f"| {step} | {kernel} | {statistics.median(got['token']):.2f} | "
                     f"{statistics.median(got['kernel']):.2f} | {statistics.median(rest):.2f} | "
                     f"{statistics.median(got['cpu']):.2f} |")
    lines += ["", "Everything else, on / off, paired within each repeat (median of the ratios): "
              f"{statistics.median(ratios['kernel']):.2f} with the kernel streaming, "
              f"{statistics.median(ratios['zeros']):.2f} back to back."]
    return emit(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
