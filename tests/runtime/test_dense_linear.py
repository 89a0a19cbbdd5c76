"""Dense projections through the kernel: the same outputs as torch's matmul, each projection computing
its own output for the input it is given."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.dense_linear import KernelLinear, use_kernel_for_dense
from runtime.kernels import load

kernel = load()
pytestmark = pytest.mark.skipif(kernel is None, reason="no C compiler or no AVX2 on this CPU")


def _attention(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    block = torch.nn.Module()
    for name, out in (("q_proj", 48), ("k_proj", 16), ("v_proj", 16), ("o_proj", 40)):
        setattr(block, name, torch.nn.Linear(40, out, bias=name == "k_proj").to(dtype))
    reference = torch.nn.Module()
    for name, child in block.named_children():
        copy = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None).to(dtype)
        copy.load_state_dict(child.state_dict())
        setattr(reference, name, copy)
    return block, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 130])  # 130: more than one kernel call holds (bf16: in pieces)
def test_projections_equal_torch(dtype, tokens):
    block, reference = _attention(dtype)
    assert use_kernel_for_dense(block, [], kernel, threads=2) == 4
    assert all(isinstance(m, KernelLinear) for m in block.children())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        x = torch.randn(1, tokens, 40).to(dtype)
        for name in ("v_proj", "q_proj", "k_proj", "o_proj"):
            ours, theirs = getattr(block, name)(x), getattr(reference, name)(x)
            assert ours.shape == theirs.shape and ours.is_contiguous()
            assert torch.allclose(ours.float(), theirs.float(), rtol=tol, atol=tol)
        # another input, and the same input changed in place: each call computes from the input it gets
        block.q_proj(x)
        other = torch.randn(1, tokens, 40).to(dtype)
        assert torch.allclose(block.k_proj(other).float(), reference.k_proj(other).float(), rtol=tol, atol=tol)
        block.q_proj(x)
        x.mul_(2)
        assert torch.allclose(block.v_proj(x).float(), reference.v_proj(x).float(), rtol=tol, atol=tol)


def test_huge_pages_keep_weights():
    from runtime.huge_pages import HUGE, bytes_in_huge_pages, move_to_huge_pages, supported

    if not supported():
        pytest.skip("huge pages are a Linux feature")
    torch.manual_seed(0)
    block = torch.nn.Module()
    for name, out in (("q_proj", 1024), ("k_proj", 1024), ("v_proj", 1024), ("o_proj", 16)):
        setattr(block, name, torch.nn.Linear(1024, out, bias=False).to(torch.bfloat16))
    reference = {name: m.weight.detach().clone() for name, m in block.named_children()}
    use_kernel_for_dense(block, [], kernel, threads=2)
    with torch.inference_mode():
        x = torch.randn(1, 1, 1024).to(torch.bfloat16)
        block.q_proj(x)  # the one-token path in use before the move: it must follow the weight
        big = 3 * 1024 * 1024 * 2  # q, k and v, 2 MB each; o_proj is too small
        moved = move_to_huge_pages(list(block.parameters()))
        assert moved % HUGE == 0 and moved <= big  # 0 where torch's allocator already gave 2 MB pages
        assert bytes_in_huge_pages(list(block.parameters())) == big
        for name, m in block.named_children():
            assert torch.equal(m.weight, reference[name]), name
            expected = F.linear(x, reference[name])
            assert torch.allclose(m(x).float(), expected.float(), rtol=2e-2, atol=2e-2), name
