"""Measurements of a CUDA accelerator: facts, host<->device copies, memory and matmul rates, experts, layers.

Every function takes the device as a value (`torch.device("cuda", N)` from the CLI). Nothing here runs
without `torch.cuda.is_available()`; the caller checks. Timings synchronise the device inside the timed
span, so they include launch latency as the runtime sees it.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from .measure import TORCH_DTYPES, ExpertPool, Timing, time_call

log = logging.getLogger(__name__)


def accelerator_facts(device: torch.device) -> dict[str, object]:
    """Name and memory from torch; driver and PCIe link from NVML when it answers (else those are omitted).

    `free_memory_bytes` is the usable memory: read once the CUDA context and a cuBLAS handle with its
    workspace exist (a small matmul makes them), as they will when `run` checks its plan."""
    props = torch.cuda.get_device_properties(device)
    a = torch.ones(64, 64, device=device)
    (a @ a).sum().item()  # the context, cuBLAS and its workspace: what every run has made before it fits
    del a
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    facts: dict[str, object] = {"name": props.name, "memory_bytes": int(total), "free_memory_bytes": int(free)}
    facts.update(_nvml_facts(props))
    return facts


def _nvml_facts(props: object) -> dict[str, object]:
    try:
        import pynvml
    except ImportError:
        log.info("pynvml is not installed: driver and PCIe link omitted from the profile")
        return {}
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVML missing or refusing: facts omitted, never an error (the brief's rule)
        log.info("NVML unavailable (%s): driver and PCIe link omitted", exc)
        return {}
    out: dict[str, object] = {}
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        out["driver"] = driver.decode() if isinstance(driver, bytes) else str(driver)
        # CUDA and NVML may number devices differently (CUDA_VISIBLE_DEVICES): match by PCI bus id.
        bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        # The maximum of link and slot, not the current one: the link trains down when idle.
        out["pcie_gen"] = int(pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle))
        out["pcie_width"] = int(pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle))
    except Exception as exc:
        log.info("NVML query failed (%s): some accelerator facts omitted", exc)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


def _sync(device: torch.device) -> Callable[[], None]:
    return lambda: torch.cuda.synchronize(device)


def time_transfer(device: torch.device, direction: str, pinned: bool, nbytes: int, *, warmup: int,
                  repeats: int, min_seconds: float = 0.0) -> Timing:
    """Time of one copy of `nbytes` host->device (`h2d`) or device->host (`d2h`), host side pinned or pageable."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    host.fill_(1)  # touch every page so that first-touch faults are not timed
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    if direction == "h2d":
        def call() -> None:
            dev.copy_(host, non_blocking=pinned)
    elif direction == "d2h":
        def call() -> None:
            host.copy_(dev, non_blocking=pinned)
    else:
        raise ValueError(f"direction must be h2d or d2h, got {direction!r}")
    return time_call(call, warmup=warmup, repeats=repeats, min_seconds=min_seconds, sync=_sync(device))


def time_registered_h2d(device: torch.device, nbytes: int, *, warmup: int, repeats: int,
                        min_seconds: float = 0.0) -> Timing:
    """Time of one host->device copy of `nbytes` from ordinary host memory page-locked in place
    (`cudaHostRegister`), as the runtime locks the experts (runtime/device.py), rather than from an
    allocation made pinned."""
    host = torch.ones(nbytes, dtype=torch.uint8)  # ordinary pages, every one touched
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    cudart = torch.cuda.cudart()
    ptr = host.untyped_storage().data_ptr()
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    if getattr(err, "value", err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed (error {getattr(err, 'value', err)})")
    try:
        return time_call(lambda: dev.copy_(host, non_blocking=True), warmup=warmup, repeats=repeats,
                         min_seconds=min_seconds, sync=_sync(device))
    finally:
        cudart.cudaHostUnregister(ptr)


def time_host_sync(device: torch.device, nbytes: int, *, warmup: int, repeats: int) -> Timing:
    """Round trip of the runtime's per-layer host sync on an idle device: `nbytes` (a decode token's ids,
    gate weights and hidden states: a few KB) copied device-to-host into a pinned buffer, one event
    recorded after the copy, the host waiting for it (runtime/device.py, `CudaDevice.fetch`)."""
    src = torch.ones(max(1, nbytes), dtype=torch.uint8, device=device)
    dst = torch.empty(max(1, nbytes), dtype=torch.uint8, pin_memory=True)
    event = torch.cuda.Event()

    def call() -> None:
        dst.copy_(src, non_blocking=True)
        event.record()
        event.synchronize()

    return time_call(call, warmup=warmup, repeats=repeats, sync=_sync(device))


def memory_read_gbps(device: torch.device, nbytes: int, *, warmup: int, repeats: int) -> float:
    """Device memory read rate: a sum over a float32 buffer far larger than the L2 cache."""
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    t = time_call(lambda: x.sum(), warmup=warmup, repeats=repeats, sync=_sync(device))
    return x.numel() * 4 / t.median_s / 1e9


def matmul_tflops(device: torch.device, dtype: str, n: int, *, warmup: int, repeats: int) -> float:
    """Rate of one square matmul of side `n` (2 n^3 operations)."""
    a = torch.randn(n, n, device=device).to(TORCH_DTYPES[dtype])
    b = torch.randn(n, n, device=device).to(TORCH_DTYPES[dtype])
    t = time_call(lambda: a @ b, warmup=warmup, repeats=repeats, sync=_sync(device))
    return 2.0 * n ** 3 / t.median_s / 1e12


def l2_bytes(device: torch.device) -> int:
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)


def gpu_expert_pool(hidden: int, intermediate: int, dtype: str, device: torch.device) -> ExpertPool:
    """Copies of one expert on the device, together larger than twice its L2: a hit reads from HBM."""
    one = 3 * hidden * intermediate * torch.tensor([], dtype=TORCH_DTYPES[dtype]).element_size()
    copies_bytes = max(2 * l2_bytes(device), 2 * one)
    return ExpertPool(hidden, intermediate, dtype, device=device, pool_bytes=copies_bytes)


def time_gpu_expert(pool: ExpertPool, tokens: int, *, warmup: int, repeats: int, min_seconds: float = 0.0
                    ) -> Timing:
    """Time of one gated expert FFN on `tokens` tokens on the pool's device (weights resident there)."""
    from runtime.expert_math import ffn, silu_gate

    x = (torch.randn(tokens, pool.hidden) * 0.1).to(pool.device, pool.dtype)

    def call() -> None:
        w_in, w_out = pool.next()
        ffn(x, w_in, w_out, silu_gate)

    with torch.inference_mode():
        return time_call(call, warmup=warmup, repeats=repeats, min_seconds=min_seconds, sync=_sync(pool.device))


def matmul_side(memory_bytes: int) -> int:
    """Side of the square matmul used for the rate: 8192, smaller on devices with little memory."""
    side = 8192
    while side > 1024 and 3 * side * side * 4 > memory_bytes // 4:
        side //= 2
    return side


def transfer_sizes(quick: bool, free_bytes: int) -> list[int]:
    """1 MiB .. 1 GiB by factors of 4 (quick: 1 MiB, 16 MiB, 256 MiB), within a quarter of free memory."""
    sizes = [1 << 20, 16 << 20, 256 << 20] if quick else [1 << (20 + 2 * i) for i in range(6)]
    return [s for s in sizes if s <= max(1 << 20, free_bytes // 4)] or [1 << 20]


def rate_from_largest(rows: list[dict[str, object]], direction: str, pinned: bool) -> float | None:
    """GB/s of the largest copy measured in that direction and kind, or None without one."""
    fit = [r for r in rows if r["direction"] == direction and r["pinned"] == pinned]
    if not fit:
        return None
    big = max(fit, key=lambda r: r["bytes"])  # type: ignore[arg-type, return-value]
    rate = float(big["bytes"]) / float(big["median_s"]) / 1e9  # type: ignore[arg-type]
    return rate if math.isfinite(rate) and rate > 0 else None
