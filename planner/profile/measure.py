"""Measurements of this host's CPU, as `moeplan profile` runs them (torch is imported here, lazily by callers).

Every figure is a median of timed repeats after warm-up, with its spread recorded. Two rules keep the
numbers honest for an offloading runtime:
- weights are read cold where the model is larger than the last-level cache. A missed expert (and a
  decoder layer of such a model) comes from DRAM, so timings rotate through a pool of copies larger
  than twice the LLC, or evict the cache before each repeat; a warm-cache number would flatter the CPU
  by the LLC's speed-up. A model whose bytes per decode token fit the LLC keeps them there, so the
  timings of the runtime's own paths (measure_moe.py, measure_dense.py) are taken warm as well, and
  the profile records the LLC's size (`llc_bytes`) for the cost model to choose between the two.
- the expert is timed through the runtime's own CPU executor (`CpuExecutor.expert`: its GEMV kernel at few
  tokens, torch's matmul above), so the profile measures what `run` runs.

`time_cpu_expert` is the function to reuse elsewhere (benchmarks, the cost model's checks).
"""
from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from runtime.cpu_executor import CpuExecutor
from runtime.expert_math import ffn, silu_gate

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_bf16",
             "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "asimd", "sve",
             "sve2", "bf16")


@dataclass(frozen=True)
class Timing:
    median_s: float
    spread: float  # (p90 - p10) / median of the repeats (max - min with fewer than 10 repeats)
    repeats: int
    min_s: float  # the fastest repeat


def time_call(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5, min_seconds: float = 0.0,
              max_repeats: int = 50, before: Callable[[], object] | None = None,
              sync: Callable[[], object] | None = None, exclude: Callable[[], float] | None = None) -> Timing:
    """Median wall time of `fn` over at least `repeats` calls (more, up to `max_repeats`, until
    `min_seconds` of timed calls have passed), after `warmup` untimed calls. `before` runs untimed
    ahead of every call (cache flush, state reset); `sync` runs inside the timed span after each call
    (a device synchronisation, so that asynchronous work is counted); `exclude`, read after each call,
    gives seconds inside it that belong to something else and are taken off."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
        if sync is not None:
            sync()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < repeats or (spent < min_seconds and len(samples) < max_repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        dt = time.perf_counter() - t0
        if exclude is not None:
            dt -= exclude()
        samples.append(dt)
        spent += dt
    return summarize(samples)


def summarize(samples: Sequence[float]) -> Timing:
    s = sorted(samples)
    n = len(s)
    mid = n // 2
    median = s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2
    lo, hi = s[int(math.floor(0.1 * (n - 1)))], s[int(math.ceil(0.9 * (n - 1)))]
    return Timing(median_s=median, spread=(hi - lo) / median if median > 0 else 0.0, repeats=n, min_s=s[0])


# ---- host facts --------------------------------------------------------------------------------
def host_facts() -> dict[str, object]:
    """CPU model, cores, ISA extensions, memory, last-level cache, OS and torch version, as the profile's
    `host` section (`llc_bytes` None where the OS does not say)."""
    cpuinfo = _read("/proc/cpuinfo")
    model = None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Processor", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    mem = psutil.virtual_memory()
    return {
        "cpu_model": model or platform.processor() or None,
        "physical_cores": psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        "logical_cores": psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "memory_bytes": int(mem.total),
        "available_memory_bytes": int(mem.available),
        "llc_bytes": llc_bytes(),
        "os": f"{platform.system()} {platform.release()}",
        "torch": torch.__version__.split("+")[0],
    }


def llc_bytes() -> int | None:
    """Size of the largest CPU cache Linux reports (the last-level cache), or None where it says nothing."""
    best = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        text = _read(str(index / "size")).strip().upper()
        if not text:
            continue
        scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1], 1)
        try:
            size = int(text.rstrip("KMG")) * scale
        except ValueError:
            continue
        best = size if best is None else max(best, size)
    return best


def cold_bytes() -> int:
    """Bytes to stream through so that nothing of a previous call stays in the cache: twice the LLC,
    and at least 256 MiB where the LLC size is unknown or small."""
    return max(2 * (llc_bytes() or 0), 256 * 1024 ** 2)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def thread_counts(physical_cores: int, quick: bool) -> list[int]:
    """Thread counts to time kernels at: 1 and all cores in a quick run; every count up to 8 and a
    doubling ladder above in a full run (the profile interpolates between them)."""
    if quick:
        return sorted({1, physical_cores})
    ladder = {n for n in range(1, min(physical_cores, 8) + 1)}
    n = 8
    while n < physical_cores:
        ladder.update((n, n + n // 2))
        n *= 2
    return sorted(x for x in ladder | {physical_cores} if x <= physical_cores)


# ---- DRAM read bandwidth -----------------------------------------------------------------------
class StreamBuffer:
    """A float32 buffer much larger than the LLC: DRAM read rate, and cache flushes between repeats."""

    def __init__(self, nbytes: int) -> None:
        self.tensor = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
        self.nbytes = self.tensor.numel() * 4
        self._flush = self.tensor[: min(self.tensor.numel(), cold_bytes() // 4)]
        self._evicted = 0  # where `evict` reads next

    def flush(self) -> None:
        """Stream twice the LLC's worth of unrelated data, evicting whatever a timed call left behind."""
        self._flush.sum()

    def evict(self, nbytes: int) -> None:
        """Read the next `nbytes` of the buffer (in turn through all of it, so that what is read was not
        read just before): unrelated data through the caches, as other layers' weights go through them."""
        n = min(max(1, nbytes // 4), self.tensor.numel())
        start = self._evicted if self._evicted + n <= self.tensor.numel() else 0
        self.tensor[start:start + n].sum()
        self._evicted = start + n

    def read_gbps(self, threads: int, *, warmup: int, repeats: int) -> tuple[float, Timing]:
        """Fastest read rate among the kernels tried (sum, dot, a one-row matrix product), and its timing.

        On one core, a reduction and a GEMV pull different rates from DRAM (prefetching differs);
        the GEMV is the access pattern of an expert at decode, and often the fastest.

        The rate is that of the best repeat, as STREAM reports it: what the memory system can deliver.
        A slower repeat measures interference (other processes, a thread preempted), not DRAM.
        """
        torch.set_num_threads(threads)
        x = self.tensor
        width = 4096 if x.numel() % 4096 == 0 else 1
        rows, v = x.view(-1, width), torch.ones(1, width)
        kernels = (lambda: x.sum(), lambda: torch.dot(x, x),  # dot reads x once: both operands alias
                   lambda: torch.nn.functional.linear(v, rows))  # [1, width] x [rows, width]^T: reads x once
        best: tuple[float, Timing] | None = None
        for kernel in kernels:
            t = time_call(kernel, warmup=warmup, repeats=repeats)
            rate = self.nbytes / t.min_s / 1e9
            if best is None or rate > best[0]:
                best = (rate, t)
        assert best is not None
        return best


# ---- expert FFN on the CPU ---------------------------------------------------------------------
class ExpertPool:
    """Copies of one random expert, together larger than twice the LLC, handed out in turn so that each
    call reads its weights from DRAM as a cache miss in the runtime does."""

    def __init__(self, hidden: int, intermediate: int, dtype: str, device: str | torch.device = "cpu",
                 pool_bytes: int | None = None, min_copies: int = 2) -> None:
        tdtype = TORCH_DTYPES[dtype]
        gen = torch.Generator().manual_seed(0)
        # Small weights keep activations finite in every dtype; values do not change the time otherwise.
        w_in = (torch.randn(2 * intermediate, hidden, generator=gen) * 0.02).to(tdtype)
        w_out = (torch.randn(hidden, intermediate, generator=gen) * 0.02).to(tdtype)
        one = (w_in.numel() + w_out.numel()) * w_in.element_size()
        copies = max(min_copies, math.ceil((cold_bytes() if pool_bytes is None else pool_bytes) / one))
        self.hidden, self.intermediate, self.dtype = hidden, intermediate, tdtype
        self.device = torch.device(device)
        # One stacked tensor per matrix, filled by a single repeat: fast even for thousands of small copies.
        # The layout of a transformers experts module's fused tensors (measure_moe.py uses them as one).
        self.w_in = w_in.to(self.device).unsqueeze(0).repeat(copies, 1, 1)  # [copies, 2I, H]
        self.w_out = w_out.to(self.device).unsqueeze(0).repeat(copies, 1, 1)  # [copies, H, I]
        self.copies = copies
        self.expert_bytes = one
        self._next = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next copy's (w_in [2I, H], w_out [H, I]), views into the pool."""
        k = self._next
        self._next = (k + 1) % self.copies
        return self.w_in[k], self.w_out[k]


def time_cpu_expert(hidden: int, intermediate: int, dtype: str, tokens: int, threads: int, *,
                    pool: ExpertPool | None = None, warmup: int = 1, repeats: int = 5,
                    min_seconds: float = 0.0) -> Timing:
    """Wall time of one gated expert FFN on `tokens` tokens with `threads` CPU threads, weights cold.

    Pass a `pool` to reuse its copies across calls (building one costs seconds for large shapes).
    """
    pool = pool or ExpertPool(hidden, intermediate, dtype)
    if (pool.hidden, pool.intermediate, pool.dtype) != (hidden, intermediate, TORCH_DTYPES[dtype]):
        raise ValueError(f"the pool holds {pool.hidden} x {pool.intermediate} {pool.dtype}, "
                         f"not {hidden} x {intermediate} {dtype}")
    torch.set_num_threads(threads)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(pool.dtype)

    executor = CpuExecutor(threads)  # the runtime's own CPU path (its GEMV kernel where it applies)

    def call() -> None:
        w_in, w_out = pool.next()
        executor.expert(x, w_in, w_out, silu_gate)

    with torch.inference_mode():
        return time_call(call, warmup=warmup, repeats=repeats, min_seconds=min_seconds)
