"""The CPU GEMV kernel path gives what torch's matmul gives, for every dtype it covers."""
from __future__ import annotations

import pytest
import torch

from model_factory import make_config, mixtral_experts
from runtime.cpu_executor import CpuExecutor
from runtime.expert_store import ExpertStore
from runtime.kernels import load


@pytest.mark.skipif(load() is None, reason="no C compiler or no AVX-512 on this CPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tokens", [1, 3, 4, 20])
def test_kernel_equals_torch(dtype, tol, tokens):
    module, config = mixtral_experts(dtype)
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


def _kernels_by_isa():
    """The kernel once per instruction set this CPU runs (an AVX-512 CPU also runs the AVX2 paths)."""
    import copy

    from runtime.kernels import ISA_AVX2, ISA_AVX512, cpu_flags, instruction_sets

    kernel = load()
    if kernel is None:
        return []
    best = instruction_sets(cpu_flags())
    per_isa = {ISA_AVX512: {dt: ISA_AVX512 for dt, isa in best.items() if isa == ISA_AVX512}}
    if {"avx2", "fma"} <= cpu_flags():
        per_isa[ISA_AVX2] = {torch.float32: ISA_AVX2, torch.bfloat16: ISA_AVX2}
    out = []
    for chosen in per_isa.values():
        if chosen:
            k = copy.copy(kernel)
            k.isa = chosen
            out.append(pytest.param(k, id=k.isa_names()[next(iter(chosen))]))
    return out


@pytest.mark.parametrize("kernel", _kernels_by_isa())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# columns that are and are not multiples of the vector width (1027, 2056 and 4104 leave tails in bf16)
# from eight tokens AVX2 sums four rows and two tokens at a time over chunks of 1024 columns: two chunks and
# a tail, odd token counts, and a second matrix of one token in the same call; 130 tokens: more than a call
# holds, run in three pieces
@pytest.mark.parametrize("rows,cols,tokens", [(37, 1024, 1), (37, 1027, 3), (5, 33, 8), (9, 7, 2), (16, 48, 64),
                                              (37, 4096, 1), (37, 2056, 1), (6, 4104, 1), (37, 2059, 9),
                                              (6, 1027, 8), (13, 4104, 10), (5, 300, 130)])
def test_multi_equals_fp32_matmul_on_odd_shapes(kernel, dtype, rows, cols, tokens):
    if not kernel.supports(dtype):
        pytest.skip(f"no {dtype} kernel for this instruction set")
    torch.manual_seed(1)
    w, x = torch.randn(rows, cols).to(dtype), torch.randn(tokens, cols).to(dtype)
    y = kernel.multi([w, w], [x, x[:1].contiguous()], 2)
    ref = x.float() @ w.float().T
    assert torch.allclose(y[0], ref, rtol=1e-5, atol=1e-4) and torch.allclose(y[1], ref[:1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel", _kernels_by_isa())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 3, 7, 13])
def test_one_token_rows_of_several_matrices(kernel, dtype, threads, rows):
    """At one token a thread reads its rows as several far-apart streams (gemv.c, stream_rows_avx2), and a
    stream may run from one matrix into the next: each row is still against its own matrix's input, and
    row counts below the streams per thread leave no row out."""
    if not kernel.supports(dtype):
        pytest.skip(f"no {dtype} kernel for this instruction set")
    torch.manual_seed(3)
    weights = [torch.randn(rows, 40).to(dtype) for _ in range(3)]
    inputs = [torch.randn(1, 40).to(dtype) for _ in range(3)]
    got = kernel.multi(weights, inputs, threads)
    for y, w, x in zip(got, weights, inputs):
        assert torch.allclose(y, x.float() @ w.float().T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel", _kernels_by_isa())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,cols", [(37, 1027), (6, 4104), (16, 48)])
def test_one_token_call_equals_linear_and_follows_a_moved_weight(kernel, dtype, threads, rows, cols):
    """`one_token` binds what depends on the weight once (the dense projections' decode path): its output
    is `linear`'s, bit for bit, and a weight re-pointed afterwards (as huge_pages.py moves parameters) is
    the one read."""
    if not kernel.supports(dtype):
        pytest.skip(f"no {dtype} kernel for this instruction set")
    torch.manual_seed(4)
    w, x = torch.randn(rows, cols).to(dtype), torch.randn(1, 1, cols).to(dtype)
    call = kernel.one_token(w)
    for _ in range(2):
        out = torch.empty(1, 1, rows, dtype=dtype)
        call(x, out, threads)
        assert torch.equal(out.view(1, rows), kernel.linear(w, x.view(1, cols), threads, dtype))
        assert torch.allclose(out.view(1, rows).float(), x.view(1, cols).float() @ w.float().T, rtol=1e-2, atol=1e-2)
        w.data = w.flip(0).contiguous()  # new storage, other values: the next call must read these


@pytest.mark.parametrize("kernel", _kernels_by_isa())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,inter", [(64, 96), (33, 17), (256, 704), (4096, 512), (512, 4096)])
def test_fused_token_equals_torch(kernel, dtype, hidden, inter):
    """The fused one-token path rounds where torch's bf16 ops round: equal to them on these shapes."""
    import torch.nn.functional as F

    if not kernel.supports(dtype):
        pytest.skip(f"no {dtype} kernel for this instruction set")
    torch.manual_seed(2)
    w_in = [torch.randn(2 * inter, hidden).mul(0.1).to(dtype) for _ in range(3)]
    w_out = [torch.randn(hidden, inter).mul(0.1).to(dtype) for _ in range(3)]
    x, gates = torch.randn(hidden).to(dtype), [0.5, 0.3, 0.2]
    ref = torch.zeros(hidden)
    for a, b, g in zip(w_in, w_out, gates):
        gate, up = F.linear(x[None], a).chunk(2, dim=-1)
        ref += F.linear(F.silu(gate) * up, b)[0].float() * g
    got = kernel.moe_token(w_in, w_out, x, gates, 2)
    assert got.dtype == dtype  # the fp32 sum rounded once to the layer's dtype, as the reference's output
    ref = ref.to(dtype).float()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.skipif(load() is None, reason="no C compiler or no AVX-512/AVX2 on this CPU")
def test_fused_path_only_for_a_silu_gate():
    """The fused kernel computes SiLU(gate) * up; a module whose own gate differs keeps the general path."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = make_config("mixtral")
    executor = CpuExecutor(2)
    silu = MixtralExperts(config)
    assert executor.fits_token(silu, torch.bfloat16)
    config.hidden_act = "gelu"
    gelu = MixtralExperts(config)
    assert not executor.fits_token(gelu, torch.bfloat16)


def test_avx2_fp32_rule_takes_the_blocked_kernel_to_64_tokens_on_two_threads():
    """The measured rule (runtime/kernels._kernel_wins, bench/results/few_token_kernel_avx2.md): on AVX2 the
    fp32 kernel beats torch up to 64 tokens on two threads, up to 32 on one; bf16 up to 64 on both; an
    input of more tokens runs in pieces, judged by its largest."""
    from runtime.kernels import ISA_AVX2, _kernel_wins

    assert _kernel_wins(ISA_AVX2, torch.float32, 48, 2) and _kernel_wins(ISA_AVX2, torch.float32, 64, 2)
    assert _kernel_wins(ISA_AVX2, torch.float32, 32, 1) and not _kernel_wins(ISA_AVX2, torch.float32, 33, 1)
    assert _kernel_wins(ISA_AVX2, torch.bfloat16, 64, 1) and not _kernel_wins(ISA_AVX2, torch.bfloat16, 65, 2)
    k = load()
    if k is not None and k.isa.get(torch.float32) == ISA_AVX2:
        assert k.handles(torch.float32, 100, 2) and not k.handles(torch.float32, 100, 1)  # pieces of 50


def test_avx512_rule_takes_one_token_on_any_thread_count():
    """The measured rule on AVX-512 (runtime/kernels._kernel_wins, bench/results/cpu_kernel_avx512_zen4.md):
    one token runs on the kernel in both dtypes whatever the threads (its rows read as far-apart streams);
    bf16 up to four tokens without AMX (the blocked kernel on Zen 4), from two tokens on torch with AMX
    (oneDNN's AMX GEMM on the Intel machine); fp32 more than one token on one thread only, up to four."""
    from runtime.kernels import ISA_AVX512, _kernel_wins

    assert _kernel_wins(ISA_AVX512, torch.float32, 1, 2) and _kernel_wins(ISA_AVX512, torch.bfloat16, 1, 2, amx=True)
    assert _kernel_wins(ISA_AVX512, torch.float32, 4, 1) and not _kernel_wins(ISA_AVX512, torch.float32, 2, 2)
    assert not _kernel_wins(ISA_AVX512, torch.bfloat16, 2, 1, amx=True) and not _kernel_wins(ISA_AVX512, torch.float32, 5, 1)
    assert _kernel_wins(ISA_AVX512, torch.bfloat16, 4, 2, amx=False) and not _kernel_wins(ISA_AVX512, torch.bfloat16, 5, 2,
                                                                                           amx=False)
