"""One profiling run: the list of measurements, run in order with progress, and the fits, as a profile dict.

`measure_profile(shapes, settings, progress=..., accelerator=...)` returns the dict that
`planner.profile.Profile.from_dict` validates; `moeplan profile` saves it. The measurements and their
order are laid out first (`plan_jobs`) so that the progress bar knows its total before anything runs.
"""
from __future__ import annotations

import datetime as _dt
import gc
import logging
import time
from collections.abc import Callable, Sequence

import torch

from .records import ExpertRow
from .fit import fit_expert_rates, fit_layer_overhead
from .measure import ExpertPool, StreamBuffer, host_facts, thread_counts, time_cpu_expert
from .measure_dense import DenseLayerBench, LayerShape
from .settings import (OVERHEAD_SHAPE, Results, Settings, dense_row, router_width, significant,
                       unique_attention_shapes, unique_expert_shapes)

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (done, total, label of the step about to run)


def measure_profile(shapes: Sequence[LayerShape], settings: Settings, *, name: str,
                    progress: Progress | None = None, accelerator: torch.device | None = None) -> dict[str, object]:
    """Measure this host for `shapes` and return the profile as a dict (schema version 1)."""
    threads_before = torch.get_num_threads()
    try:
        jobs, results = plan_jobs(shapes, settings, accelerator)
        for i, (label, job) in enumerate(jobs):
            if progress is not None:
                progress(i, len(jobs), label)
            t0 = time.perf_counter()
            job()
            log.debug("%6.2f s  %s", time.perf_counter() - t0, label)
        if progress is not None:
            progress(len(jobs), len(jobs), "done")
    finally:
        torch.set_num_threads(threads_before)
    return _assemble(results, shapes, name)


def plan_jobs(shapes: Sequence[LayerShape], settings: Settings, accelerator: torch.device | None
              ) -> tuple[list[tuple[str, Callable[[], None]]], Results]:
    """The measurements in run order, as (label, callable) pairs that fill the returned results."""
    s = settings
    r = Results()
    r.host = host_facts()
    physical = int(r.host["physical_cores"])  # type: ignore[arg-type]
    threads = list(s.threads) if s.threads else thread_counts(physical, s.quick)
    state: dict[str, object] = {}
    jobs: list[tuple[str, Callable[[], None]]] = []

    def stream() -> StreamBuffer:
        if "stream" not in state:
            state["stream"] = StreamBuffer(s.stream_bytes)
        return state["stream"]  # type: ignore[return-value]

    def memory_job(n: int) -> Callable[[], None]:
        def run() -> None:
            rate, t = stream().read_gbps(n, warmup=s.warmup, repeats=s.repeats)
            r.memory[n] = rate
            log.debug("memory read, %d threads: %.2f GB/s (spread %.2f)", n, rate, t.spread)
        return run

    for n in threads:
        jobs.append((f"DRAM read, {n} threads", memory_job(n)))

    def overhead_job(n: int) -> Callable[[], None]:
        def run() -> None:
            h, i = OVERHEAD_SHAPE
            pool = state.setdefault("overhead_pool", ExpertPool(h, i, "float32", pool_bytes=0))
            t = time_cpu_expert(h, i, "float32", 1, n, pool=pool, warmup=s.warmup, repeats=max(s.repeats, 20))
            r.overhead[n] = t.median_s
        return run

    for n in threads:
        jobs.append((f"expert call overhead, {n} threads", overhead_job(n)))

    def expert_job(shape: LayerShape, dtype: str, n: int, tokens: int, last: bool) -> Callable[[], None]:
        def run() -> None:
            key = f"pool {shape.hidden}x{shape.intermediate} {dtype}"
            if key not in state:
                state[key] = ExpertPool(shape.hidden, shape.intermediate, dtype, pool_bytes=s.pool_bytes)
            t = time_cpu_expert(shape.hidden, shape.intermediate, dtype, tokens, n, pool=state[key],  # type: ignore
                                warmup=s.warmup, repeats=s.repeats, min_seconds=s.min_seconds)
            r.expert_rows.append(ExpertRow(hidden=shape.hidden, intermediate=shape.intermediate, dtype=dtype,
                                           threads=n, tokens=tokens, median_s=significant(t.median_s),
                                           spread=round(t.spread, 3)))
            if last:  # free the pool (up to gigabytes) before the next shape builds its own
                del state[key]
                gc.collect()
        return run

    for shape in unique_expert_shapes(shapes):
        for dtype in s.dtypes:
            pairs = [(n, tok) for n in threads for tok in s.tokens]
            for j, (n, tok) in enumerate(pairs):
                jobs.append((f"expert {shape.hidden}x{shape.intermediate} {dtype}, {n} threads, {tok} tokens",
                             expert_job(shape, dtype, n, tok, last=j == len(pairs) - 1)))

    def dense_job(shape: LayerShape, dtype: str, n: int, tokens: int, context: int, last: bool
                  ) -> Callable[[], None]:
        def run() -> None:
            key = f"dense {shape.name} {dtype}"
            if key not in state:
                state[key] = DenseLayerBench(shape, dtype, "cpu")
            torch.set_num_threads(n)
            t = state[key].time(tokens, context, warmup=s.warmup, repeats=s.repeats,  # type: ignore[union-attr]
                                min_seconds=s.min_seconds, flush=stream().flush)
            r.dense_rows.append(dense_row(shape, dtype, n, tokens, context, t))
            if last:
                del state[key]
        return run

    for shape in unique_attention_shapes(shapes):
        for dtype in s.dtypes:
            # A quick run times the dense part with all cores only (as the runtime runs it).
            dense_threads = threads[-1:] if s.quick else threads
            cases = ([(n, 1, c) for n in dense_threads for c in s.contexts]
                     + [(n, s.prefill, s.prefill) for n in dense_threads])
            for j, (n, tok, ctx) in enumerate(cases):
                what = f"{tok} tokens" if tok == ctx else f"1 token at context {ctx}"
                jobs.append((f"dense layer {shape.name} {dtype}, {n} threads, {what}",
                             dense_job(shape, dtype, n, tok, ctx, last=j == len(cases) - 1)))

    if accelerator is not None:
        from .run_cuda import accelerator_jobs
        jobs.append(("free host buffers", lambda: (state.clear(), gc.collect(), None)[-1]))
        jobs.extend(accelerator_jobs(shapes, settings, accelerator, r))
    return jobs, r


def _assemble(r: Results, shapes: Sequence[LayerShape], name: str) -> dict[str, object]:
    # One fixed cost per expert call: the least over thread counts. What more threads add (waking and
    # joining the pool) then lands in that thread count's fitted rates, so the formula still reproduces
    # the measured times there.
    overhead = min(r.overhead.values()) if r.overhead else 0.0
    gbps, gflops = fit_expert_rates(r.expert_rows, overhead)
    layer_overhead = fit_layer_overhead(r.dense_rows, lambda row: r.memory[row.threads],  # type: ignore[index]
                                        router_width(shapes))
    cpu: dict[str, object] = {
        "memory_read_gbps": {n: significant(v) for n, v in sorted(r.memory.items())},
        "expert_gbps": {dt: {n: significant(v) for n, v in c.items()} for dt, c in gbps.items()} or None,
        "expert_gflops": {dt: {n: significant(v) for n, v in c.items()} for dt, c in gflops.items()} or None,
        "expert_overhead_s": significant(overhead) if r.overhead else None,
        "layer_overhead_s": None if layer_overhead is None else significant(layer_overhead),
        "expert_ffn": [_row(x) for x in r.expert_rows],
        "dense_layer": [_row(x) for x in r.dense_rows],
    }
    return {
        "version": 1,
        "name": name,
        "source": "measured",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": r.host,
        "cpu": {k: v for k, v in cpu.items() if v is not None},
        "accelerator": r.accelerator,
    }


def _row(row: object) -> dict[str, object]:
    return {k: v for k, v in vars(row).items() if v is not None}

