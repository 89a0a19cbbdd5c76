"""The int8/int4 matrix format in torch: the packed layout byte by byte, the quantization rule, dequantization."""
from __future__ import annotations

import pytest
import torch

from runtime.contracts.expert_format import matrix_bytes
from runtime.quant_format import dequantize, group_size_of, pack_int4, quantize, unpack_int4


def test_int4_layout_low_nibble_first_offset_8():
    q = torch.tensor([[-8, 7, 0, -1, 3, -4, 5, 6]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 4)
    # byte j: input 2j in the low nibble, 2j+1 in the high, each as q + 8
    assert packed.tolist() == [[0 | (15 << 4), 8 | (7 << 4), 11 | (4 << 4), 13 | (14 << 4)]]
    assert torch.equal(unpack_int4(packed), q)
    # read as little-endian int32 [N, K/8]: value i of the word in bits 4i..4i+3 (compressed-tensors)
    word = int(packed.view(torch.int32)[0, 0]) & 0xFFFFFFFF
    assert [((word >> (4 * i)) & 0xF) - 8 for i in range(8)] == q[0].tolist()


def test_pack_round_trip_every_code():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 4)  # [3, 64]
    assert torch.equal(unpack_int4(pack_int4(q)), q)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantize_shapes_bytes_and_error(fmt):
    torch.manual_seed(0)
    w = torch.randn(2, 96, 128, dtype=torch.bfloat16)  # a stack of experts
    q, s = quantize(w, fmt, 32)
    assert s.dtype == torch.float16 and s.shape == (2, 96, 4)
    assert q.shape == ((2, 96, 128) if fmt == "int8" else (2, 96, 64))
    assert q.dtype == (torch.int8 if fmt == "int8" else torch.uint8)
    assert q[0].numel() * q.element_size() + s[0].numel() * 2 == matrix_bytes(fmt, 96, 128, 32)
    assert group_size_of(q, s, fmt) == 32
    back = dequantize(q, s, fmt, torch.float32)
    rel = float(((back - w.float()) ** 2).mean() / (w.float() ** 2).mean())
    assert rel < (1e-4 if fmt == "int8" else 1.5e-2)


def test_int8_rule_absmax_over_127_rounded_up_to_a_power_of_two():
    w = torch.tensor([[0.5, -1.27, 0.01, 1.0] * 8], dtype=torch.float32)  # one group of 32
    q, s = quantize(w, "int8", 32)
    assert float(s) == 2.0 ** -6  # 1.27 / 127 = 0.01 -> 1/64
    assert int(q.min()) == -81 and int(q.max()) == 64  # round(1.27 * 64), round(1.0 * 64)
    # every group's scale is 0 or +-2^e, however the weights fall, and no code leaves [-127, 127]
    torch.manual_seed(3)
    w = torch.randn(64, 256) * torch.logspace(-9, 4, 64).unsqueeze(1)
    w[0, :32] = 0.0
    w[1, :32] = 127 * 2.0 ** -5  # absmax / 127 a power of two already: kept, q reaches 127
    q, s = quantize(w, "int8", 32)
    mantissa, _ = torch.frexp(s.float())
    assert bool(((mantissa.abs() == 0.5) | (s == 0)).all()) and float(s[0, 0]) == 0.0
    assert float(s[1, 0]) == 2.0 ** -5 and int(q[1, :32].max()) == 127
    assert int(q.abs().max()) <= 127
    big = s.float().abs() >= 2.0 ** -14  # a normal float16 scale: the codes use at least half the range
    assert bool((q.reshape(64, 8, 32).abs().amax(-1)[big] >= 64).all())


def test_int4_rule_q4_0_signed_max_maps_to_minus_8():
    # the largest magnitude is negative: scale = max / -8 > 0, its magnitude rounded up to 5 significant
    # bits (0.2 -> 26/128), and it maps to -8
    w = torch.linspace(-1.6, 1.0, 32).reshape(1, 32)
    q, s = quantize(w, "int4", 32)
    codes = unpack_int4(q)
    assert float(s) == 26 / 128 and int(codes[0, 0]) == -8
    # the largest magnitude is positive: scale < 0, so the maximum maps to -8 and the range stays [-8, 7]
    q, s = quantize(-w, "int4", 32)
    codes = unpack_int4(q)
    assert float(s) == -26 / 128 and int(codes[0, 0]) == -8
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7


def test_int4_scales_have_5_significant_bits_and_the_max_still_maps_to_minus_8():
    """Every stored scale has at most 5 significant bits (so float(scale) * q is a bf16: the kernel's
    factored groups), whatever the weights' magnitudes, and rounding up keeps each group's largest
    magnitude at code -8."""
    torch.manual_seed(4)
    w = torch.randn(64, 256) * torch.logspace(-9, 4, 64).unsqueeze(1)
    w[0, :32] = 0.0
    q, s = quantize(w, "int4", 32)
    bits = s.float().view(torch.int32)
    assert bool(((bits & 0x7FFFF) == 0).all()) and float(s[0, 0]) == 0.0
    codes = unpack_int4(q).reshape(64, 8, 32)
    normal = s.float().abs() >= 2.0 ** -20  # above float16's subnormal rounding
    assert bool((codes.amin(-1)[normal] == -8).all())


def test_dequantize_is_scale_times_code_rounded_once_to_the_dtype():
    torch.manual_seed(1)
    w = torch.randn(4, 64)
    q, s = quantize(w, "int4", 32)
    codes = unpack_int4(q).float()
    expected = (codes * s.float().repeat_interleave(32, dim=1)).to(torch.bfloat16)
    assert torch.equal(dequantize(q, s, "int4", torch.bfloat16), expected)
    out = torch.empty(4, 64, dtype=torch.bfloat16)
    assert dequantize(q, s, "int4", torch.bfloat16, out=out) is out and torch.equal(out, expected)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_dequantize_into_out_by_blocks_of_rows_is_the_same(fmt):
    torch.manual_seed(2)
    w = torch.randn(20000, 64)  # more rows than one block of the CPU's 1M values
    q, s = quantize(w, fmt, 32)
    out = torch.empty(20000, 64, dtype=torch.bfloat16)
    assert torch.equal(dequantize(q, s, fmt, torch.bfloat16, out=out), dequantize(q, s, fmt, torch.bfloat16))


def test_zero_group_and_bad_group():
    q, s = quantize(torch.zeros(2, 32), "int4", 32)
    assert float(s.abs().max()) == 0 and torch.equal(unpack_int4(q), torch.zeros(2, 32, dtype=torch.int8))
    assert torch.equal(dequantize(q, s, "int4", torch.float32), torch.zeros(2, 32))
    with pytest.raises(ValueError, match="group size 32 does not divide the input size 48"):
        quantize(torch.zeros(2, 48), "int8", 32)
    with pytest.raises(ValueError, match="not an integer expert format"):
        quantize(torch.zeros(2, 32), "bfloat16", 32)
