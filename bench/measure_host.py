"""A CPU-only hardware profile for the benchmark, measured now, with the runtime's own expert kernel.

Used by bench/predict_vs_measure.py when no `--profile` is given (or `moeplan profile` has not written
one for this host): on a shared machine the profile must be measured under the load the runs see, so
the benchmark measures it right before them. It times `runtime.expert_math.ffn` on the benchmark
model's expert shape for each thread count and token count, and host memory reads and copies. The
one figure it cannot time in isolation, `cpu.layer_overhead_s`, is fitted from one calibration run
(a plan that is not among the validated ones): see `fit_layer_overhead`.
"""
from __future__ import annotations

import os
import platform
import socket
import statistics
import time
from typing import Any

import psutil
import torch

from runtime.expert_math import ffn, silu_gate

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(median, spread) of `repeats` timings after two warm-up calls; spread = (max - min) / median."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return median, (max(times) - min(times)) / median


def measure(hidden: int, intermediate: int, dtype: str, threads: list[int], tokens: list[int],
            repeats: int = 9, pool_bytes: int = 1 << 30) -> dict[str, Any]:
    """A profile dict (schema version 1) with the expert table of this shape and host memory rates.

    Every timed call uses the next expert of a pool of distinct weights of `pool_bytes` in all, and
    the read rate is timed on a buffer of that size, so that the figures are DRAM figures as in a
    run (which streams each token's experts from memory) rather than cache figures: set it well
    above the last-level cache (`lscpu`).
    """
    dt = DTYPES[dtype]
    one = 3 * hidden * intermediate * torch.empty((), dtype=dt).element_size()
    pool = [(torch.full((2 * intermediate, hidden), 0.01, dtype=dt), torch.full((hidden, intermediate), 0.01, dtype=dt))
            for _ in range(max(2, pool_bytes // one))]
    block = torch.ones(pool_bytes // 4, dtype=torch.float32)
    rows, read_gbps, expert_gbps = [], {}, {}
    saved = torch.get_num_threads()
    turn = iter(range(1 << 62))
    try:
        for n in threads:
            torch.set_num_threads(n)
            for t in tokens:
                x = torch.randn(t, hidden, dtype=dt)

                def call() -> None:
                    w_in, w_out = pool[next(turn) % len(pool)]
                    ffn(x, w_in, w_out, silu_gate)

                median, spread = _timed(call, repeats)
                rows.append({"hidden": hidden, "intermediate": intermediate, "dtype": dtype, "threads": n,
                             "tokens": t, "median_s": median, "spread": round(spread, 4)})
                if t == 1:
                    expert_gbps[n] = one / median / 1e9
            median, _ = _timed(lambda: block.sum(), 5)
            read_gbps[n] = block.numel() * 4 / median / 1e9
    finally:
        torch.set_num_threads(saved)
    vm = psutil.virtual_memory()
    return {
        "version": 1,
        "name": f"{socket.gethostname()}-bench",
        "source": "measured",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpu_model": platform.processor() or platform.machine(),
                 "physical_cores": psutil.cpu_count(logical=False) or os.cpu_count() or 1,
                 "logical_cores": os.cpu_count() or 1, "memory_bytes": vm.total,
                 "available_memory_bytes": vm.available, "os": f"{platform.system()} {platform.release()}",
                 "torch": str(torch.__version__)},
        "cpu": {"memory_read_gbps": read_gbps, "expert_gbps": {dtype: expert_gbps},
                "expert_ffn": rows, "layer_overhead_s": 0.0},
        "accelerator": None,
    }


def fit_layer_overhead(profile: dict[str, Any], run: dict[str, Any], seconds_without_overhead: float,
                       num_layers: int) -> float:
    """Per-layer fixed cost that makes the prediction of one calibration run equal its measurement.

    `seconds_without_overhead` is the predicted seconds per decode token of that run with
    layer_overhead_s = 0; the rest of the measured time per token is spread over the decoder layers.
    """
    measured = 1.0 / run["decode_tokens_per_s"]
    return max(0.0, (measured - seconds_without_overhead) / num_layers)
