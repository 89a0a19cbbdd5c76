"""The int8/int4 CPU kernels (runtime/kernels/qgemv.c) against torch on the dequantized weights.

The reference dequantizes as the conformance reference does (model dtype of float(scale) * q) and multiplies
in fp32. The kernel multiplies exactly those weights (for a bf16 model: rounded to bf16) with fp32 sums, so
the only difference allowed is the order of the fp32 additions: per output, at most TOL times the sum of
|w * x| over its inputs (the worst-case bound is K * 2^-24 times that sum; summation-order differences
observed here are below 1e-6 of it). The tolerance is tight enough to see a kernel that skips the bf16
rounding of the weights, and a packing mistake (swapped nibbles) is far outside it: both are checked below,
so these tests fail when the kernel is wrong.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from runtime.kernels import ISA_AVX2, ISA_AVX2_VNNI, GemvKernel, cpu_flags, int_layout, library, load

TOL = 2e-5
SHAPES = [  # (rows N, inputs K, group size G): odd row counts and every group-size case the paths take
    (37, 64, 32),    # int4 of a bf16 model by table (G % 32 == 0)
    (130, 512, 128),
    (64, 256, 16),   # int4, G % 16 == 0 but not 32: the even/odd path
    (9, 48, 24),     # G % 16 == 8: eight inputs at a time
    (16, 8, 8),      # one group of eight
    (5, 96, 32),
    (300, 1024, 64),
    (33, 2112, 32),  # from a few tokens (int4 5, int8 32) the rows are dequantized once and summed in
    (7, 1096, 8),    # chunks of 1024 inputs: two chunks and a part
]


@pytest.fixture(scope="module", params=[ISA_AVX2, ISA_AVX2_VNNI], ids=["avx2", "avx2-vnni"])
def kernel(request):
    """The kernel with each int instruction set this CPU runs (a CPU with AVX512-VNNI runs both builds of
    qgemv.c, the AVX2 one as a CPU without VNNI or AVX512-BF16 would: fp32 blocks from a few tokens; with
    them, bf16 blocks), which must have built wherever the CPU runs the int path (a failed build would
    otherwise make every test here skip)."""
    if os.environ.get("MOEPLAN_NO_KERNEL"):
        pytest.skip("MOEPLAN_NO_KERNEL is set")
    if not {"avx2", "fma", "f16c"} <= cpu_flags():
        pytest.skip("the int kernels need AVX2, FMA and F16C")
    if request.param == ISA_AVX2_VNNI and not {"avx512_vnni", "avx512vl"} <= cpu_flags():
        pytest.skip("this CPU has no AVX512-VNNI")
    k = load()
    assert k is not None, "the C kernels did not build or load (runtime/kernels/__init__.py: library())"
    assert k.int_isa is not None
    if k.int_isa == request.param:
        return k
    lib, isa = library()
    if request.param == ISA_AVX2:  # what a CPU without AVX512-BF16 runs: the fp32 block path too
        isa = {dtype: ISA_AVX2 for dtype in isa}
    return GemvKernel(lib, isa, int_isa=request.param)


def quantized(n: int, k: int, group: int, fmt: str, gen: torch.Generator, powers_of_two: str = "none",
              bits: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight, scales, q): random codes over the whole range and scales of both signs, with zero and
    subnormal float16 scales among them, packed as runtime/contracts/expert_format.py says.
    powers_of_two "all": every scale rounded to +-2^e (runtime/quant_format.py's int8 rule; 2^-20 is a
    float16 subnormal), the case where the kernel takes the scale out of each group's sum; "mixed": only
    the scales of every third row and of every other block of eight groups, so that a row and the rows
    read side by side switch between the two paths. bits 5: rounded to 5 significant bits instead
    (runtime/quant_format.py's int4 rule; the int4 kernel's factored groups)."""
    lo, hi = (-127, 128) if fmt == "int8" else (-8, 8)
    q = torch.randint(lo, hi, (n, k), generator=gen, dtype=torch.int8)
    scales = (torch.randn(n, k // group, generator=gen) * 0.02).to(torch.float16)
    flat = scales.view(-1)
    flat[::7] = 3e-7  # subnormal in float16
    flat[::11] = 0.0
    flat[::13] = -5e-6
    if powers_of_two != "none":
        mantissa, exponent = torch.frexp(scales.float())
        top = torch.trunc(torch.ldexp(mantissa, torch.full_like(exponent, bits))) if bits > 1 else torch.sign(mantissa)
        rounded = torch.ldexp(top * 2.0 ** -bits if bits > 1 else top * 0.5, exponent).to(torch.float16)
        rounded.view(-1)[::17] = 2.0 ** -20
        if bits == 5:
            rounded.view(-1)[::19] = -(2.0 ** -17) * 19 / 16  # a float16 subnormal with 5 significant bits
        pick = torch.ones_like(scales, dtype=torch.bool)
        if powers_of_two == "mixed":
            rows = torch.arange(n).unsqueeze(1) % 3 == 0
            blocks = (torch.arange(k // group).unsqueeze(0) // 8) % 2 == 0
            pick = rows | blocks
        scales = torch.where(pick, rounded, scales)
    if fmt == "int8":
        return q, scales, q
    codes = (q + 8).to(torch.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), scales, q


def dequantized(q: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The reference's weights: dtype(float(scale) * q)."""
    return (scales.float().repeat_interleave(group, dim=1) * q.float()).to(dtype)


def assert_close(got: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> None:
    """got == x @ w^T up to the order of fp32 sums (see the module docstring)."""
    ref = x.float() @ w.float().T
    bound = TOL * (x.float().abs() @ w.float().abs().T) + 1e-30
    excess = ((got.float() - ref).abs() / bound).max().item()
    assert excess <= 1.0, f"kernel differs from torch by {excess:.3g} times the summation-order tolerance"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}g{g}" for n, k, g in SHAPES])
# rows dequantized once: int4 from 5 tokens, int8 from 32, both from 2 into bf16 (a bf16 model, AVX512-BF16)
@pytest.mark.parametrize("tokens", [1, 2, 3, 6, 7, 33])
@pytest.mark.parametrize("threads", [1, 2])
def test_qmulti_equals_torch(kernel, fmt, dtype, shape, tokens, threads):
    n, k, group = shape
    gen = torch.Generator().manual_seed(n * 1000 + k + tokens)
    count = 3  # a layer's missed experts in one call, each with its own input and token count
    mats = [quantized(n, k, group, fmt, gen) for _ in range(count)]
    xs = [torch.randn(max(1, tokens - i), k, generator=gen).to(dtype) for i in range(count)]
    got = kernel.qmulti([(qw, s) for qw, s, _ in mats], xs, threads)
    for (_, s, q), x, y in zip(mats, xs, got):
        assert y.shape == (x.shape[0], n) and y.dtype == torch.float32
        assert_close(y, dequantized(q, s, group, dtype), x)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_bf16_outputs_round_as_torch(kernel, fmt, tokens):
    """out_dtype bfloat16: the fp32 result rounded once, within one bf16 step of torch's bf16 matmul."""
    gen = torch.Generator().manual_seed(7)
    qw, s, q = quantized(96, 256, 32, fmt, gen)
    x = torch.randn(tokens, 256, generator=gen).to(torch.bfloat16)
    f32 = kernel.qmulti([(qw, s)], [x], 2)[0]
    b16 = kernel.qmulti([(qw, s)], [x], 2, out_dtype=torch.bfloat16)[0]
    assert b16.dtype == torch.bfloat16
    assert torch.equal(b16, f32.to(torch.bfloat16))
    theirs = F.linear(x, dequantized(q, s, 32, torch.bfloat16))
    step = theirs.float().abs() * 2.0 ** -7 + 1e-30  # one bf16 unit in the last place, at most
    assert ((b16.float() - theirs.float()).abs() <= step).all()


def test_tolerance_sees_missing_bf16_rounding(kernel):
    """The tolerance can tell the reference's bf16-rounded weights from the unrounded float(scale) * q: a
    kernel that skipped the rounding would fail test_qmulti_equals_torch."""
    gen = torch.Generator().manual_seed(3)
    for fmt in ("int8", "int4"):
        qw, s, q = quantized(64, 256, 32, fmt, gen)
        x = torch.randn(2, 256, generator=gen).to(torch.bfloat16)
        unrounded = x.float() @ dequantized(q, s, 32, torch.float32).T
        with pytest.raises(AssertionError):
            assert_close(unrounded, dequantized(q, s, 32, torch.bfloat16), x)
        assert_close(kernel.qmulti([(qw, s)], [x], 1)[0], dequantized(q, s, 32, torch.bfloat16), x)


@pytest.mark.parametrize("group", [32, 16, 8])
def test_swapped_nibbles_are_caught(kernel, group):
    """Packed the other way round (input 2j in the high nibble), the same codes give other results: the
    kernel reads the layout of the format, and the tests would see one that read it wrong."""
    gen = torch.Generator().manual_seed(group)
    qw, s, q = quantized(40, 128, group, "int4", gen)
    swapped = ((qw >> 4) | (qw << 4)).contiguous()
    x = torch.randn(1, 128, generator=gen).to(torch.bfloat16)
    w = dequantized(q, s, group, torch.bfloat16)
    assert_close(kernel.qmulti([(qw, s)], [x], 1)[0], w, x)
    with pytest.raises(AssertionError):
        assert_close(kernel.qmulti([(swapped, s)], [x], 1)[0], w, x)


def reference_moe_token(x: torch.Tensor, experts: list, gate_weights: list[float], group: int) -> torch.Tensor:
    """torch on the dequantized weights, rounding where the model's bf16 ops round: each matmul output, the
    SiLU, the product; the weighted sum in fp32, rounded once to x's dtype."""
    out = torch.zeros(x.shape[-1], dtype=torch.float32)
    for (w_in, w_out), weight in zip(experts, gate_weights):
        h = F.linear(x, dequantized(w_in[2], w_in[1], group, x.dtype))
        g, u = h.chunk(2, dim=-1)
        y = F.linear(F.silu(g) * u, dequantized(w_out[2], w_out[1], group, x.dtype))
        out += weight * y.float().reshape(-1)
    return out.to(x.dtype).reshape(x.shape)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dims", [(64, 96, 32), (128, 256, 64), (48, 40, 8)], ids=["h64i96", "h128i256", "h48i40g8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_qmoe_token(kernel, fmt, dtype, dims, threads):
    """The fused one-token path equals the same steps through qmulti (the same rows, summed in the same
    order): bit for bit in bf16, where the SiLU is rounded; in fp32 up to the SiLU's last bits (the C
    expf against torch's). And torch's on the dequantized weights within the bf16 rounding of its steps."""
    hidden, inter, group = dims
    gen = torch.Generator().manual_seed(hidden + inter)
    experts = [(quantized(2 * inter, hidden, group, fmt, gen), quantized(hidden, inter, group, fmt, gen))
               for _ in range(3)]
    gate_weights = [0.5, 0.3, 0.2]
    x = torch.randn(1, hidden, generator=gen).to(dtype)
    got = kernel.qmoe_token([(i[0], i[1]) for i, _ in experts], [(o[0], o[1]) for _, o in experts], x,
                            gate_weights, threads)
    assert got.shape == x.shape and got.dtype == dtype

    steps = torch.zeros(hidden, dtype=torch.float32)
    for (w_in, w_out), weight in zip(experts, gate_weights):
        h = kernel.qmulti([(w_in[0], w_in[1])], [x], threads, out_dtype=dtype)[0]
        g, u = h.chunk(2, dim=-1)
        m = (F.silu(g) * u).contiguous()
        y = kernel.qmulti([(w_out[0], w_out[1])], [m], threads, out_dtype=dtype)[0]
        steps += weight * y.float().reshape(-1)
    if dtype == torch.bfloat16:
        assert torch.equal(got.reshape(-1), steps.to(dtype))
    else:
        assert torch.allclose(got.reshape(-1), steps, rtol=1e-5, atol=1e-6 * steps.abs().max().item())

    ref = reference_moe_token(x, experts, gate_weights, group)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item())


@pytest.mark.parametrize("powers_of_two", ["all", "mixed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(37, 512, 32), (70, 1024, 64), (9, 48, 24)], ids=["37x512g32", "70x1024g64", "9x48g24"])
@pytest.mark.parametrize("tokens", [1, 3, 6])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_power_of_two_scales_factor_out_exactly(kernel, powers_of_two, dtype, shape, tokens, threads):
    """int8 groups whose scale is 0 or +-2^e (dequant.h: the kernel then sums q * x and multiplies by the
    scale once per group): still the reference's bf16-rounded weights up to the order of the sums, alone
    and mixed with groups of other scales in the same rows and in the rows read beside them. (Were the
    scale factored out of the other groups too, the bf16 rounding of their weights would be missed, which
    test_tolerance_sees_missing_bf16_rounding shows the tolerance sees.)"""
    n, k, group = shape
    gen = torch.Generator().manual_seed(n + k + tokens)
    mats = [quantized(n, k, group, "int8", gen, powers_of_two) for _ in range(3)]
    xs = [torch.randn(max(1, tokens - i), k, generator=gen).to(dtype) for i in range(3)]
    for (_, s, q), x, y in zip(mats, xs, kernel.qmulti([(qw, s) for qw, s, _ in mats], xs, threads)):
        assert_close(y, dequantized(q, s, group, dtype), x)


@pytest.mark.parametrize("powers_of_two", ["all", "mixed"])
@pytest.mark.parametrize("threads", [1, 2])
def test_qmoe_token_int8_power_of_two_scales(kernel, powers_of_two, threads):
    """The fused one-token path with factored int8 groups: torch's on the dequantized weights, within the
    bf16 rounding of its steps (as test_qmoe_token)."""
    hidden, inter, group = 128, 256, 32
    gen = torch.Generator().manual_seed(threads)
    experts = [(quantized(2 * inter, hidden, group, "int8", gen, powers_of_two),
                quantized(hidden, inter, group, "int8", gen, powers_of_two)) for _ in range(2)]
    x = torch.randn(1, hidden, generator=gen).to(torch.bfloat16)
    got = kernel.qmoe_token([(i[0], i[1]) for i, _ in experts], [(o[0], o[1]) for _, o in experts], x,
                            [0.6, 0.4], threads)
    ref = reference_moe_token(x, experts, [0.6, 0.4], group)
    assert torch.allclose(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())


@pytest.mark.parametrize("scales", ["all", "mixed"])
@pytest.mark.parametrize("shape", [(37, 512, 32), (70, 1024, 32), (130, 512, 64), (5, 96, 32)],
                         ids=["37x512g32", "70x1024g32", "130x512g64", "5x96g32"])
@pytest.mark.parametrize("tokens", [1, 3, 6])
@pytest.mark.parametrize("threads", [1, 2])
def test_int4_5_bit_scales_factor_out_exactly(kernel, scales, shape, tokens, threads):
    """int4 groups of 32 of a bf16 model whose scales have at most 5 significant bits (dequant.h: summed as
    codes times inputs and multiplied by the scale once): still the reference's bf16 weights up to the
    order of the sums, alone and mixed with table groups in the same rows and the rows read beside them."""
    n, k, group = shape
    gen = torch.Generator().manual_seed(n + k + tokens + 1)
    mats = [quantized(n, k, group, "int4", gen, scales, bits=5) for _ in range(3)]
    xs = [torch.randn(max(1, tokens - i), k, generator=gen).to(torch.bfloat16) for i in range(3)]
    for (_, s, q), x, y in zip(mats, xs, kernel.qmulti([(qw, s) for qw, s, _ in mats], xs, threads)):
        assert_close(y, dequantized(q, s, group, torch.bfloat16), x)


@pytest.mark.parametrize("threads", [1, 2])
def test_int4_factored_groups_hold_wide_inputs(kernel, threads):
    """The factored int4 groups hold one token's inputs as 22-bit fixed point below each group's largest
    (runtime/kernels/q4planes.h): inputs spread over 2^-30 .. 2^10 inside every group, an all-zero group,
    a tiny group (2^-80) and one below the fixed point's smallest scale (2^-120) stay within the
    summation-order tolerance; an inf input makes every output non-finite, as torch's sums do."""
    n, k, group = 37, 256, 32
    gen = torch.Generator().manual_seed(threads + 20)
    qw, s, q = quantized(n, k, group, "int4", gen, "all", bits=5)
    x = torch.randn(1, k, generator=gen) * 2.0 ** torch.randint(-30, 11, (1, k), generator=gen).float()
    x[0, 32:64] = 0.0
    x[0, 64:96] *= 2.0 ** -80
    x[0, 96:128] = torch.randn(32, generator=gen) * 2.0 ** -120
    x = x.to(torch.bfloat16)
    w = dequantized(q, s, group, torch.bfloat16)
    assert_close(kernel.qmulti([(qw, s)], [x], threads)[0], w, x)
    x[0, 100] = float("inf")
    assert not torch.isfinite(kernel.qmulti([(qw, s)], [x], threads)[0]).any()


@pytest.mark.parametrize("scales", ["all", "mixed"])
@pytest.mark.parametrize("threads", [1, 2])
def test_qmoe_token_int4_5_bit_scales(kernel, scales, threads):
    """The fused one-token path with factored int4 groups, both projections (the down projection reads the
    SiLU product in both input layouts): torch's on the dequantized weights, within its bf16 steps."""
    hidden, inter, group = 128, 256, 32
    gen = torch.Generator().manual_seed(threads + 10)
    experts = [(quantized(2 * inter, hidden, group, "int4", gen, scales, bits=5),
                quantized(hidden, inter, group, "int4", gen, scales, bits=5)) for _ in range(2)]
    x = torch.randn(1, hidden, generator=gen).to(torch.bfloat16)
    got = kernel.qmoe_token([(i[0], i[1]) for i, _ in experts], [(o[0], o[1]) for _, o in experts], x,
                            [0.6, 0.4], threads)
    ref = reference_moe_token(x, experts, [0.6, 0.4], group)
    assert torch.allclose(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())
    steps = torch.zeros(hidden, dtype=torch.float32)  # the same rows through qmulti: bit for bit
    for (w_in, w_out), weight in zip(experts, [0.6, 0.4]):
        h = kernel.qmulti([(w_in[0], w_in[1])], [x], threads, out_dtype=torch.bfloat16)[0]
        g, u = h.chunk(2, dim=-1)
        y = kernel.qmulti([(w_out[0], w_out[1])], [(F.silu(g) * u).contiguous()], threads, out_dtype=torch.bfloat16)[0]
        steps += weight * y.float().reshape(-1)
    assert torch.equal(got.reshape(-1), steps.to(torch.bfloat16))


def test_token_limit_and_bad_layouts(kernel):
    gen = torch.Generator().manual_seed(0)
    qw, s, q = quantized(8, 64, 32, "int8", gen)
    # more tokens than one call holds: in pieces (here 3 of 43-44), in one call, each input's rows in order
    xs = [torch.randn(2 * kernel.int_max_tokens + 3, 64, generator=gen), torch.randn(2, 64, generator=gen)]
    ys = kernel.qmulti([(qw, s), (qw, s)], xs, 1)
    assert [y.shape[0] for y in ys] == [x.shape[0] for x in xs] and kernel.handles_int("int8", torch.float32, 131, 1)
    for x, y in zip(xs, ys):
        assert_close(y, dequantized(q, s, 32, torch.float32), x)
    with pytest.raises(ValueError, match="do not fit"):
        int_layout(qw, s[:, :1].contiguous().repeat(1, 3))  # 3 groups of 64 / 3 inputs
    with pytest.raises(ValueError, match="not an int8/int4 matrix"):
        int_layout(qw.float(), s)
    with pytest.raises(ValueError, match="do not run"):
        kernel.qmulti([(qw, s)], [torch.randn(1, 64).half()], 1)
    assert kernel.supports_int("int4", torch.bfloat16) and not kernel.supports_int("int4", torch.float16)


class CountingKernel:
    """The real kernel, counting the int calls that reach it (so a test sees that the executor routed its
    int experts through the kernel and not through torch's fallback, which gives nearly the same numbers)."""

    def __init__(self, kernel) -> None:
        self._kernel = kernel
        self.calls = {"qmulti": 0, "qmoe_token": 0}

    def __getattr__(self, name):
        return getattr(self._kernel, name)

    def qmulti(self, *args, **kwargs):
        self.calls["qmulti"] += 1
        return self._kernel.qmulti(*args, **kwargs)

    def qmoe_token(self, *args, **kwargs):
        self.calls["qmoe_token"] += 1
        return self._kernel.qmoe_token(*args, **kwargs)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_executor_runs_int_experts_on_the_kernel(kernel, fmt, dtype):
    """CpuExecutor's seam (quantized_multi) and fused token path (token) take the int kernels and give what
    its torch path gives (dequantize into the model dtype, then matmul)."""
    from model_factory import mixtral_experts
    from runtime.cpu_executor import CpuExecutor
    from runtime.expert_store import ExpertStore
    from runtime.quant_experts import quantize_module, quantized_of

    module, config = mixtral_experts(dtype)
    quantize_module(module, fmt, 32, "test")
    store = ExpertStore(module, slots=0, device=torch.device("cpu"), dtype=dtype)
    counting = CountingKernel(kernel)
    fast = CpuExecutor(2, kernel=counting)  # type: ignore[arg-type]
    plain = CpuExecutor(2, use_kernel=False)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for tokens in (1, 4, 70):  # 70: expert 0 gets them all, above the kernel's 64: two pieces in the same call
        x = torch.randn(tokens, config.hidden_size).to(dtype)
        idx = torch.stack([torch.randperm(module.num_experts - 1)[:2] + 1 for _ in range(tokens)])
        if tokens > kernel.int_max_tokens:
            idx[:, 0] = 0
        weights = torch.rand(tokens, 2)
        jobs = []
        for e in idx.unique().tolist():
            tok, rank = (idx == e).nonzero(as_tuple=True)
            jobs.append((tok, rank, e))
        before = counting.calls["qmulti"]
        with torch.no_grad():
            got = fast.run(module, store, x, weights, jobs)
            ref = plain.run(module, store, x, weights, jobs)
        assert torch.allclose(got, ref, rtol=tol, atol=tol * ref.abs().max().item())
        assert counting.calls["qmulti"] == before + 2  # the input projections, then the output projections
    assert fast.fits_token_quantized(module, quantized_of(module), dtype)
    assert not plain.fits_token_quantized(module, quantized_of(module), dtype)
    x = torch.randn(1, config.hidden_size).to(dtype)
    chosen = [(store.host_weights(3), 0.7), (store.host_weights(5), 0.3)]
    got = fast.token_quantized(x, chosen)
    assert counting.calls["qmoe_token"] == 1 and got.dtype == dtype
    jobs = [(torch.tensor([0]), torch.tensor([0]), 3), (torch.tensor([0]), torch.tensor([1]), 5)]
    ref = plain.run(module, store, x, torch.tensor([[0.7, 0.3]]), jobs).to(dtype)
    assert torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item())
