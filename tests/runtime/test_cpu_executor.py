"""The CPU GEMV kernel path gives what torch's matmul gives, for every dtype it covers."""
from __future__ import annotations

import pytest
import torch

from model_factory import make_config
from runtime.cpu_executor import CpuExecutor
from runtime.expert_store import ExpertStore
from runtime.kernels import load


@pytest.mark.skipif(load() is None, reason="no C compiler or no AVX-512 on this CPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tokens", [1, 3, 4, 20])
def test_kernel_equals_torch(dtype, tol, tokens):
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    torch.manual_seed(0)
    config = make_config("mixtral")
    module = MixtralExperts(config).to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.05)
    store = ExpertStore(module, slots=0, device=torch.device("cpu"))
    x = torch.randn(tokens, config.hidden_size, dtype=dtype)
    idx = torch.stack([torch.randperm(module.num_experts)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2)
    jobs = []
    for e in idx.unique().tolist():
        tok, rank = (idx == e).nonzero(as_tuple=True)
        jobs.append((tok, rank, e))
    with torch.no_grad():
        fast = CpuExecutor(1, use_kernel=True).run(module, store, x, weights, jobs)
        plain = CpuExecutor(1, use_kernel=False).run(module, store, x, weights, jobs)
    assert torch.allclose(fast, plain, rtol=tol, atol=tol * plain.abs().max().item())
