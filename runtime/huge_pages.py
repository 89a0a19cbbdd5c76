"""The CPU-resident weights in 2 MB pages.

A decode token streams every weight it uses once, and with 4 KB pages that is a TLB miss (a nested page
walk in a VM) and a restart of the hardware prefetcher, which stops at page boundaries, every 4 KB. On
the AVX2 development machine the expert kernel read 18.7 GB/s on two threads from 2 MB pages against
16.8 from 4 KB pages (bench/results/huge_pages.md).

Two ways in, the first one free:
- At birth: torch's CPU allocator advises MADV_HUGEPAGE for every allocation of 2 MB or more when the
  environment says `THP_MEM_ALLOC_ENABLE=1`, which it reads once, at its first allocation. The command
  line asks for it before anything is allocated (`request_for_new_tensors`), so the fused expert tensors
  that transformers builds at load are born in 2 MB pages. A 2 MB fault costs no more than the 512 4 KB
  faults it replaces (the model loaded as fast either way on the development machine).
- By copy (`move_to_huge_pages`): each storage not yet in 2 MB pages (the 2 MB dense weights, which an
  allocation 4 KB-aligned cannot hold in a whole 2 MB page, or everything when torch allocated before the
  request) is copied into a fresh 2 MB-aligned mapping advised MADV_HUGEPAGE. About 1 s per GB there.
Linux only; storages under 2 MB and pinned memory are left alone.
"""
from __future__ import annotations

import bisect
import mmap
import os
import sys
from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: the command line calls request_for_new_tensors first thing
    import torch

HUGE = 2 << 20
ENV = "THP_MEM_ALLOC_ENABLE"  # read by torch's CPU allocator (c10/core/impl/alloc_cpu.cpp)


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")


def request_for_new_tensors(wanted: bool = True) -> None:
    """Ask torch's CPU allocator for 2 MB pages for its large allocations (or not). Effective only before
    the process's first torch allocation; a value the user set in the environment wins."""
    if supported():
        os.environ.setdefault(ENV, "1" if wanted else "0")


def _huge_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of nbytes, 2 MB-aligned, in a private anonymous mapping advised to use huge pages
    (the tensor holds the mapping)."""
    import torch

    region = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    start = (-whole.data_ptr()) % HUGE
    return whole[start:start + nbytes]


class PageMap:
    """This process's mappings and how many bytes of each are in 2 MB pages, read once from
    /proc/self/smaps (AnonHugePages). Empty where the file does not exist."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ranges: list[tuple[int, int, int]] = []  # (start, end, bytes in huge pages)
        try:
            with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
                lines = smaps.readlines()
        except OSError:
            return
        current: list[int] | None = None
        mappings = []
        for line in lines:
            head = line.split(maxsplit=2)
            if not head:
                continue
            if head[0] == "AnonHugePages:" and current is not None:
                current[2] = int(head[1]) * 1024
            elif "-" in head[0] and not head[0].endswith(":"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = [start, end, 0]
                mappings.append(current)
        for start, end, huge in sorted(mappings):
            self.starts.append(start)
            self.ranges.append((start, end, huge))

    def in_huge_pages(self, address: int, nbytes: int) -> bool:
        """Whether the mapping holding [address, address + nbytes) has at least the whole 2 MB pages that
        range could hold in 2 MB pages (an allocation's unaligned head and tail stay in 4 KB pages)."""
        i = bisect.bisect_right(self.starts, address) - 1
        if i < 0:
            return False
        start, end, huge = self.ranges[i]
        if address + nbytes > end:
            return False
        aligned = (address + nbytes) // HUGE * HUGE - (address + HUGE - 1) // HUGE * HUGE
        return aligned > 0 and huge >= aligned


def _storages(params: list[torch.nn.Parameter]) -> dict[int, list[torch.nn.Parameter]]:
    """The CPU storages of 2 MB or more behind `params` (by data pointer), with the parameters sharing each."""
    by_storage: dict[int, list[torch.nn.Parameter]] = defaultdict(list)
    for p in params:
        if p.device.type == "cpu" and not p.is_pinned() and p.untyped_storage().nbytes() >= HUGE:
            by_storage[p.untyped_storage().data_ptr()].append(p)
    return by_storage


def _span(sharing: list[torch.nn.Parameter]) -> tuple[int, int]:
    """(first byte, byte count) of what the parameters use of their storage: a moved storage also holds the
    unused head that aligns it."""
    start = min(p.data_ptr() for p in sharing)
    return start, max(p.data_ptr() + p.numel() * p.element_size() for p in sharing) - start


def bytes_in_huge_pages(params: list[torch.nn.Parameter]) -> int:
    """Bytes of the CPU weights behind `params` that lie in 2 MB pages (shared storage counted once)."""
    if not supported():
        return 0
    pages = PageMap()
    spans = [_span(sharing) for sharing in _storages(params).values()]
    return sum(nbytes for start, nbytes in spans if pages.in_huge_pages(start, nbytes))


def born_in_huge_pages(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's allocator gave the largest of these storages 2 MB pages: then the rest is small, and
    moving it costs little."""
    storages = _storages(params)
    if not supported() or not storages:
        return False
    largest = max(storages.values(), key=lambda sharing: _span(sharing)[1])
    return PageMap().in_huge_pages(*_span(largest))


def move_to_huge_pages(params: list[torch.nn.Parameter]) -> int:
    """Copy each CPU storage of `params` that is not in 2 MB pages yet (each once; parameters sharing a
    storage keep sharing it) into huge pages and re-point the parameters at the copy; returns the bytes
    moved."""
    if not supported():
        return 0
    import torch

    pages = PageMap()
    moved = 0
    for sharing in _storages(params).values():
        if pages.in_huge_pages(*_span(sharing)):
            continue
        old = sharing[0].untyped_storage()
        new = _huge_buffer(old.nbytes())
        new.copy_(torch.empty(0, dtype=torch.uint8).set_(old))
        storage, start = new.untyped_storage(), new.storage_offset()  # start: bytes, a multiple of 2 MB
        for p in sharing:
            offset = start // p.element_size() + p.storage_offset()
            p.data = torch.empty(0, dtype=p.dtype).set_(storage, offset, p.shape, p.stride())
        moved += old.nbytes()
    return moved
