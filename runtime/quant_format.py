"""int8 and int4 expert matrices in torch: quantize, pack and unpack int4, dequantize into the model dtype.

The layout is runtime/contracts/expert_format.py's (qweight int8 [N, K] or uint8 [N, K/2] with two codes
per byte, low nibble first, each q + 8; float16 scales [N, K/G]; w = float(scale) * q). Every function
here also takes a stack of matrices ([E, N, K] and so on): a layer's experts are quantized in one call.

The rule (how q and the scale are chosen), measured by bench/quant_rule.py (results in
bench/results/quant_rule.md) on Gaussian and on the embedded tiny-moe model's trained expert weights:
- int8: the symmetric rule with the scale rounded up to a power of two: scale = 2^ceil(log2(absmax / 127)),
  q = round(w / scale) in [-127, 127]. Why a power of two: then every float(scale) * q is a bf16 already (q
  has at most 7 significant bits), so the CPU kernel can take the scale out of each group's sum and still
  multiply exactly the reference's weights bf16(float(scale) * q), at a third of the per-weight vector
  operations of dequantizing each weight and rounding it to bf16 (runtime/kernels/dequant.h; speed in
  bench/results/cpu_kernel_int_avx2.md). The cost: the step is up to 2x llama.cpp Q8_0's absmax / 127
  (1.41x on average), its mean squared error about 2.1x (bench/results/quant_rule.md), and the embedded
  model's perplexity moves by the amount in bench/results/perplexity_avx2.md. Checkpoints whose int8 scales
  are not powers of two (written elsewhere, or by an earlier moeplan) load and run as they are: the kernel
  decides group by group.
- int4: llama.cpp Q4_0's rule, scale = m / -8 where m is the group's weight of largest magnitude, with
  its sign, so that m itself maps to -8 exactly and the full [-8, 7] range is used (q = round(w / scale),
  clamped to 7 at the other end), with the scale's magnitude rounded up to 5 significant bits (float16 keeps
  11). Why: then every float(scale) * q is a bf16 already (q has at most 3 significant bits), so the CPU
  kernel can take the whole scale out of each group's sum and multiply exactly the reference's weights
  without the per-mantissa byte tables (runtime/kernels/dequant.h); rounding up keeps m's code at -8 (m /
  scale in [-8, -7.75]). The cost: a step at most 1/16 (on average about 1/32) longer than Q4_0's, in
  bench/results/quant_rule.md and bench/results/perplexity_avx2.md. Checkpoints with other int4 scales run
  as they are on the table path. The plain symmetric rule (absmax / 7, codes in [-7, 7]) leaves the
  code -8 unused and spends 15 levels on the group's range where Q4_0 spends 16 on the same range: its
  step is 8/7 of Q4_0's, and its mean squared reconstruction error measured 1.28x Q4_0's
  (the table in bench/results/quant_rule.md).
In both, the scale is rounded to float16 first and the codes are chosen against the stored scale, so the
codes are the best for the scale the kernels will read. A group of zeros gets scale 0 and codes 0.
"""
from __future__ import annotations

import torch

from .contracts.expert_format import INT_FORMATS

# float16's largest finite value: a scale beyond it would be stored as inf
_FP16_MAX = float(torch.finfo(torch.float16).max)
_FP16_MAX_5_BITS = 31.0 * 2.0 ** 11  # 0b11111 * 2^11, the largest float16 with 5 significant bits


def _check(fmt: str, inputs: int, group_size: int) -> None:
    if fmt not in INT_FORMATS:
        raise ValueError(f"not an integer expert format: {fmt!r}")
    if inputs % group_size:
        raise ValueError(f"group size {group_size} does not divide the input size {inputs}")


def quantize(w: torch.Tensor, fmt: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] (any float dtype) -> (qweight, scales float16 [..., N, K/G]) in `fmt`'s layout."""
    *lead, n, k = w.shape
    _check(fmt, k, group_size)
    groups = w.float().reshape(*lead, n, k // group_size, group_size)
    if fmt == "int8":
        scale = rule_scales(groups.abs().amax(dim=-1) / 127.0, fmt)
        lo, hi = -127, 127
    else:
        # Q4_0: the signed weight of largest magnitude maps to -8
        idx = groups.abs().argmax(dim=-1, keepdim=True)
        scale = rule_scales(torch.gather(groups, -1, idx).squeeze(-1) / -8.0, fmt)
        lo, hi = -8, 7
    scales = scale.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
    stored = scales.float().unsqueeze(-1)
    inverse = torch.where(stored != 0, 1.0 / stored, torch.zeros_like(stored))
    q = torch.round(groups * inverse).clamp_(lo, hi).to(torch.int8).reshape(*lead, n, k)
    del groups, inverse
    return (q if fmt == "int8" else pack_int4(q)), scales


def rule_scales(raw: torch.Tensor, fmt: str) -> torch.Tensor:
    """Float32 scales as the rule stores them, before the float16 cast: int8 up to a power of two, int4
    up to 5 significant bits (the module docstring). Benchmarks use it to give random experts the scales a
    quantized checkpoint has."""
    return _power_of_two_at_least(raw) if fmt == "int8" else _round_up_to_5_bits(raw)


def _round_up_to_5_bits(v: torch.Tensor) -> torch.Tensor:
    """Each value's magnitude rounded up to 5 significant bits (sign kept; at most float16's largest such
    value), so that the float16 it is stored as holds it exactly (down to 2^-20; below, float16's
    subnormal spacing of 2^-24 leaves fewer significant bits still)."""
    mantissa, exponent = torch.frexp(v.abs())  # |v| = mantissa * 2^exponent, mantissa in [0.5, 1)
    up = torch.ldexp(torch.ceil(torch.ldexp(mantissa, torch.full_like(exponent, 5))), exponent - 5)
    return torch.sign(v) * up.clamp(max=_FP16_MAX_5_BITS)


def _power_of_two_at_least(v: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= each value, 0 for 0, kept within float16's powers of two
    (2^-24 .. 2^15), so that the stored scale is exactly that power of two."""
    mantissa, exponent = torch.frexp(v)  # v = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)  # v is a power of two already
    p = torch.ldexp(torch.ones_like(v), exponent.clamp(-24, 15))
    return torch.where(v > 0, p, torch.zeros_like(v))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], [..., K] -> uint8 [..., K/2]: input 2j in the low nibble, 2j+1 in the high,
    each as q + 8."""
    codes = (q.to(torch.int16) + 8).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int8 codes in [-8, 7], [..., K] (the inverse of `pack_int4`)."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, fmt: str, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """(qweight, scales) of [..., N, K] -> the matrix in `dtype`: dtype(float(scale) * q), computed in
    float32 and rounded once, as the conformance reference does. `out` (if given, [N, K] of one matrix)
    receives it, a block of rows at a time, so that the float32 working copies stay small however big the
    matrix (a decode token dequantizes every expert it computes through torch)."""
    if out is not None and qweight.dim() == 2:
        rows = max(1, _BLOCK_VALUES[qweight.device.type == "cpu"] // out.shape[-1])
        if qweight.shape[0] > rows:
            for start in range(0, qweight.shape[0], rows):
                stop = start + rows
                out[start:stop].copy_(_dequantize(qweight[start:stop], scales[start:stop], fmt))
            return out
    w = _dequantize(qweight, scales, fmt)
    if out is None:
        return w.to(dtype)
    out.copy_(w)
    return out


# values dequantized at once into `out` (float32 working copies of 4 MB on the CPU, where they would
# count in resident memory and fragment the heap; 64 MB on an accelerator, where each block costs launches)
_BLOCK_VALUES = {True: 1 << 20, False: 1 << 24}


def _dequantize(qweight: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """float32 float(scale) * q of [..., N, K]."""
    q = qweight if fmt == "int8" else unpack_int4(qweight)
    *lead, n, k = q.shape
    groups = scales.shape[-1]
    _check(fmt, k, k // groups if groups else 1)
    w = q.reshape(*lead, n, groups, k // groups).float() * scales.float().unsqueeze(-1)
    return w.reshape(*lead, n, k)


def group_size_of(qweight: torch.Tensor, scales: torch.Tensor, fmt: str) -> int:
    """The group size a (qweight, scales) pair was made with, from their shapes."""
    inputs = qweight.shape[-1] * (1 if fmt == "int8" else 2)
    return inputs // scales.shape[-1]
