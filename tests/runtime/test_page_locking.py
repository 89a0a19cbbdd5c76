"""Page-locking in place, the parts that run without a GPU: what would be registered, and which expert
tensors must first become private memory (a view of the memory-mapped checkpoint cannot be locked in place
without pinning the file's page cache)."""
from __future__ import annotations

import torch

from runtime.device import RecordingDevice, unique_storages
from runtime.loader import _is_file_mapped


def test_each_storage_is_registered_once_whatever_its_views():
    fused = torch.zeros(4, 8, 16, dtype=torch.bfloat16)  # one layer's experts, [E, ...]
    other = torch.zeros(3, dtype=torch.float32)
    views = [fused[0], fused[3], fused, other]
    regions = unique_storages(views)
    assert sorted(n for _, n in regions) == [3 * 4, 4 * 8 * 16 * 2]
    seam = RecordingDevice()
    assert seam.lock_host(views) == 4 * 8 * 16 * 2 + 12 == seam.locked_bytes


def test_file_mapped_tensors_are_told_from_private_memory(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(4096))
    mapped = torch.from_file(str(path), shared=True, size=4096, dtype=torch.uint8)
    assert _is_file_mapped(mapped)
    assert not _is_file_mapped(mapped.clone())
    assert not _is_file_mapped(torch.zeros(1 << 20))
