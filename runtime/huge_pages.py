"""The CPU-resident weights in 2 MB pages.

A decode token streams every weight it uses once, and with 4 KB pages that is a TLB miss (a nested page
walk in a VM) and a restart of the hardware prefetcher, which stops at page boundaries, every 4 KB. On
the AVX2 development machine, in four end-to-end runs side by side with 4 KB pages, decode ran -2 to
+8 % faster (noise there: about 5 %), and an fp32 model started 5 s sooner with a peak RSS of 3.5 GB
against 5.4 (docs/benchmarks.md, end-to-end runs 3 and 4).

Two ways in, the first one free:
- At birth: torch's CPU allocator advises MADV_HUGEPAGE for every allocation of 2 MB or more when the
  environment says `THP_MEM_ALLOC_ENABLE=1`, which it reads once, at its first allocation. The command
  line asks for it before anything is allocated (`request_for_new_tensors`), so the fused expert tensors
  that transformers builds at load are born in 2 MB pages. A 2 MB fault costs no more than the 512 4 KB
  faults it replaces (the process took no longer to start and load on the development machine).
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


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor, born in 2 MB pages where the process asked for them
    (`request_for_new_tensors`) and it is 2 MB or more: the quantized experts' tables, which moeplan
    allocates itself. torch's allocator advises huge pages for a large allocation but may serve it from
    memory the heap already holds in 4 KB pages (measured: 1 to 19 of the benchmark model's 32 int4 tables
    in 2 MB pages, by the run); a fresh mapping has no such history."""
    import math

    import torch

    nbytes = math.prod(shape) * dtype.itemsize
    if not supported() or os.environ.get(ENV) != "1" or nbytes < HUGE:
        return torch.empty(shape, dtype=dtype)
    return _huge_buffer(nbytes).view(dtype).view(shape)


def _mappings() -> list[tuple[int, int, int]]:
    """This process's mappings as (start, end, bytes in 2 MB pages), sorted, from /proc/self/smaps
    (AnonHugePages); empty where the file does not exist."""
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
            lines = smaps.readlines()
    except OSError:
        return []
    mappings: list[list[int]] = []
    for line in lines:
        head = line.split(maxsplit=2)
        if not head:
            continue
        if head[0] == "AnonHugePages:" and mappings:
            mappings[-1][2] = int(head[1]) * 1024
        elif "-" in head[0] and not head[0].endswith(":"):
            mappings.append([*(int(x, 16) for x in head[0].split("-")), 0])
    return sorted((start, end, huge) for start, end, huge in mappings)


def _aligned(start: int, nbytes: int) -> int:
    """Bytes of [start, start + nbytes) in whole 2 MB-aligned pages: the most of it 2 MB pages can hold."""
    return max(0, (start + nbytes) // HUGE * HUGE - (start + HUGE - 1) // HUGE * HUGE)


def _in_huge_pages(spans: list[tuple[int, int]]) -> list[bool]:
    """For each (start, bytes) range of weights, whether it lies in 2 MB pages.

    smaps counts huge pages per mapping, not per range, so the verdict is per mapping: its ranges are in
    huge pages when the mapping holds little else (at most one 2 MB page more per range: an allocation's
    alignment) and its huge pages cover their aligned parts. A mapping holding other data too (the
    malloc heap) gets no verdict, and its ranges count as not in huge pages: a move then makes sure."""
    mappings = _mappings()
    starts = [m[0] for m in mappings]
    members: dict[int, list[int]] = defaultdict(list)  # mapping index -> indices of the spans in it
    for n, (start, nbytes) in enumerate(spans):
        i = bisect.bisect_right(starts, start) - 1
        if i >= 0 and start + nbytes <= mappings[i][1]:
            members[i].append(n)
    verdict = [False] * len(spans)
    for i, inside in members.items():
        begin, end, huge = mappings[i]
        held = sum(spans[n][1] for n in inside)
        aligned = sum(_aligned(*spans[n]) for n in inside)
        if end - begin <= held + HUGE * len(inside) and aligned > 0 and huge >= aligned:
            for n in inside:
                verdict[n] = True
    return verdict


def _storages(params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """The CPU storages of 2 MB or more behind `params`, each as the parameters sharing it."""
    by_storage: dict[int, list[torch.nn.Parameter]] = defaultdict(list)
    for p in params:
        if p.device.type == "cpu" and not p.is_pinned() and p.untyped_storage().nbytes() >= HUGE:
            by_storage[p.untyped_storage().data_ptr()].append(p)
    return list(by_storage.values())


def _span(sharing: list[torch.nn.Parameter]) -> tuple[int, int]:
    """(first byte, byte count) of what the parameters use of their storage: a moved storage also holds the
    unused head that aligns it."""
    start = min(p.data_ptr() for p in sharing)
    return start, max(p.data_ptr() + p.numel() * p.element_size() for p in sharing) - start


def bytes_in_huge_pages(params: list[torch.nn.Parameter]) -> int:
    """Bytes of the CPU weights behind `params` that lie in 2 MB pages (shared storage counted once)."""
    if not supported():
        return 0
    spans = [_span(sharing) for sharing in _storages(params)]
    return sum(nbytes for (_, nbytes), huge in zip(spans, _in_huge_pages(spans)) if huge)


def _largest_is_huge(spans: list[tuple[int, int]], verdicts: list[bool]) -> bool:
    return bool(spans) and verdicts[max(range(len(spans)), key=lambda n: spans[n][1])]


def born_in_huge_pages(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's allocator gave the largest of these storages 2 MB pages: then the rest is small, and
    moving it costs little."""
    if not supported():
        return False
    spans = [_span(sharing) for sharing in _storages(params)]
    return _largest_is_huge(spans, _in_huge_pages(spans))


def move_to_huge_pages(params: list[torch.Tensor], only_if_born: bool = False) -> int:
    """Copy each CPU storage of `params` (parameters, or the quantized experts' tables) that is not in 2 MB
    pages yet (each once; tensors sharing a storage keep sharing it) into huge pages and re-point the
    tensors at the copy; returns the bytes moved. With `only_if_born`, nothing moves unless the largest
    storage was born in 2 MB pages (then the rest is small and cheap to move; otherwise the copy would cost
    about 1 s per GB)."""
    if not supported():
        return 0
    import torch

    storages = _storages(params)
    spans = [_span(sharing) for sharing in storages]
    verdicts = _in_huge_pages(spans)  # one read of smaps for the decision and the move
    if only_if_born and not _largest_is_huge(spans, verdicts):
        return 0
    moved = 0
    for sharing, huge in zip(storages, verdicts):
        if huge:
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
