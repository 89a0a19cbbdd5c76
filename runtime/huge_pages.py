"""Move the CPU-resident weights into 2 MB pages (`moeplan run --huge-pages`).

A decode token streams every weight it uses once, and with 4 KB pages that is a TLB miss (a nested page
walk in a VM) and a restart of the hardware prefetcher, which stops at page boundaries, every 4 KB. On
the AVX2 development machine the expert kernel read 18.7 GB/s on two threads from 2 MB pages against
16.8 from 4 KB pages, and a decode token of the benchmark model took 8 % less (bench/results/huge_pages.md).

The price is paid once, at load: each weight storage is copied into a fresh private mapping advised
MADV_HUGEPAGE, whose first touch the kernel serves with 2 MB pages (zeroed, and compacted for where
memory is fragmented): about 0.9 GB/s on that machine, 1.6 s for the 1.46 GB model. Collapsing the pages
in place (MADV_COLLAPSE) was slower there (0.2 GB/s). It pays for itself after some hundreds of tokens,
so it is an option, not the default. Linux only; storages under 2 MB and pinned memory are left alone.
"""
from __future__ import annotations

import mmap
import sys
from collections import defaultdict

import torch

HUGE = 2 << 20


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")


def _huge_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of nbytes, 2 MB-aligned, in a private anonymous mapping advised to use huge pages
    (the tensor holds the mapping)."""
    region = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    start = (-whole.data_ptr()) % HUGE
    return whole[start:start + nbytes]


def move_to_huge_pages(params: list[torch.nn.Parameter]) -> int:
    """Copy each CPU storage of `params` (each once; parameters sharing a storage keep sharing it) into huge
    pages and re-point the parameters at the copy; returns the bytes moved."""
    if not supported():
        return 0
    by_storage: dict[int, list[torch.nn.Parameter]] = defaultdict(list)
    for p in params:
        if p.device.type == "cpu" and not p.is_pinned():
            by_storage[p.untyped_storage().data_ptr()].append(p)
    moved = 0
    for sharing in by_storage.values():
        old = sharing[0].untyped_storage()
        if old.nbytes() < HUGE:
            continue
        new = _huge_buffer(old.nbytes())
        new.copy_(torch.empty(0, dtype=torch.uint8).set_(old))
        storage, start = new.untyped_storage(), new.storage_offset()  # start: bytes, a multiple of 2 MB
        for p in sharing:
            offset = start // p.element_size() + p.storage_offset()
            p.data = torch.empty(0, dtype=p.dtype).set_(storage, offset, p.shape, p.stride())
        moved += old.nbytes()
    return moved
