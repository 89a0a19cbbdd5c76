"""The expert format contract: bytes of a matrix and an expert per format, and the accounting that uses them."""
from __future__ import annotations

from dataclasses import replace

import pytest

from runtime.contracts import expert_format as fmt
from runtime.contracts.memory import HOST, memory_items
from runtime.contracts.model_shape import ModelShape
from runtime.errors import ModelError

MIXTRAL = ModelShape(name="mixtral-8x7b", num_layers=32, moe_layers=tuple(range(32)), num_experts=8, top_k=2,
                     hidden=4096, expert_intermediate=14336, shared_expert_intermediate=0, dense_intermediate=0,
                     num_heads=32, num_kv_heads=8, head_dim=128, vocab=32000, tied_embeddings=False,
                     dtype="bfloat16")


def test_matrix_bytes_per_format():
    n, k = 96, 64
    assert fmt.matrix_bytes("float32", n, k) == n * k * 4
    assert fmt.matrix_bytes("bfloat16", n, k) == fmt.matrix_bytes("float16", n, k) == n * k * 2
    assert fmt.matrix_bytes("int8", n, k) == n * k + 2 * n * k // 32
    assert fmt.matrix_bytes("int4", n, k) == n * k // 2 + 2 * n * k // 32
    assert fmt.matrix_bytes("int4", n, k, group_size=64) == n * k // 2 + 2 * n
    with pytest.raises(ValueError, match="unknown expert format 'int3'"):
        fmt.matrix_bytes("int3", n, k)


def test_mixtral_expert_bytes():
    # the format file's figure: a Mixtral-8x7B expert is about 99 MB in int4 (G=32) against 352 MB in bf16
    assert fmt.expert_bytes("bfloat16", 4096, 14336) == 352_321_536
    int4 = fmt.expert_bytes("int4", 4096, 14336)
    assert int4 == 3 * 4096 * 14336 // 2 + 2 * 3 * 4096 * 14336 // 32 == 99_090_432
    assert fmt.expert_bytes("int8", 4096, 14336) == 3 * 4096 * 14336 + 2 * 3 * 4096 * 14336 // 32


def test_checks_name_what_is_wrong():
    assert fmt.check_format("int4") is None and fmt.check_format("bfloat16") is None
    assert "must be one of bfloat16, float16, float32, int8, int4, got 'q4_0'" in fmt.check_format("q4_0")
    assert fmt.check_group_size(32, 4096) is None
    assert "multiple of 8" in fmt.check_group_size(12)
    assert "multiple of 8" in fmt.check_group_size(0)
    assert "must be an integer" in fmt.check_group_size(True)
    assert "does not divide" in fmt.check_group_size(64, 96)
    assert fmt.is_quantized("int8") and not fmt.is_quantized("bfloat16")


def test_shape_and_memory_accounting_are_format_aware():
    int4 = MIXTRAL.with_experts("int4")
    assert int4.expert_format == "int4" and int4.expert_bytes == 99_090_432
    assert int4.expert_bytes_total == 32 * 8 * 99_090_432
    assert int4.dense_bytes == MIXTRAL.dense_bytes  # the dense part stays in the model dtype
    assert MIXTRAL.with_experts("bfloat16") == MIXTRAL  # a float format equal to the dtype is the plain model
    assert MIXTRAL.with_experts("int8", group_size=128).expert_bytes == fmt.expert_bytes("int8", 4096, 14336,
                                                                                         group_size=128)
    with pytest.raises(ModelError, match="expert format must be one of"):
        MIXTRAL.with_experts("int2")
    with pytest.raises(ModelError, match="expert group size must be a multiple of 8"):
        replace(MIXTRAL, expert_dtype="int4", expert_group_size=7)

    plain = memory_items(MIXTRAL, slots=4, on_accelerator=True, kv_tokens=10, pass_tokens=10)
    quant = memory_items(int4, slots=4, on_accelerator=True, kv_tokens=10, pass_tokens=10)
    assert quant["accelerator"]["expert_slots"] == 4 * 99_090_432
    assert quant["host"]["experts"] == int4.expert_bytes_total
    assert quant["accelerator"]["dequant_scratch"] == MIXTRAL.expert_bytes  # one expert in bf16
    assert "dequant_scratch" not in plain["accelerator"]
    cpu = memory_items(int4, slots=0, on_accelerator=False, kv_tokens=10, pass_tokens=10)
    assert set(cpu) == {HOST} and cpu[HOST]["dequant_scratch"] == MIXTRAL.expert_bytes


def test_cpu_expert_pass_counts_what_the_cpu_experts_hold_for_a_prompt():
    """A layer's CPU experts run in one call: per (token, expert) pair its input and output rows (H each),
    its [gate; up] rows (2I) and gated rows (I) in bf16, plus the kernels' float32 copy of the widest input
    row. A 2,048-token Mixtral prompt: 4,096 pairs of (2 x 4096 + 3 x 14336) x 2 + 4 x 14336 bytes."""
    from runtime.contracts.cache_policy import MissRule

    prompt = memory_items(MIXTRAL, slots=0, on_accelerator=False, kv_tokens=2048, pass_tokens=2048)
    assert prompt[HOST]["cpu_expert_pass"] == 2048 * 2 * ((2 * 4096 + 3 * 14336) * 2 + 4 * 14336) == 654_311_424
    assert prompt[HOST]["cpu_expert_pass"] > 2 * prompt[HOST]["workspace"]  # what the workspace missed
    # every miss on the accelerator: the CPU computes none
    gpu = memory_items(MIXTRAL, slots=4, on_accelerator=True, kv_tokens=2048, pass_tokens=2048,
                       rule=MissRule(compute="accelerator"))
    assert gpu[HOST]["cpu_expert_pass"] == 0 and gpu["accelerator"]["transfer_scratch"] > 0
    # misses of 16 tokens or more go to the accelerator: each of the 8 CPU experts has at most 15 tokens
    mixed = memory_items(MIXTRAL, slots=4, on_accelerator=True, kv_tokens=2048, pass_tokens=2048,
                         rule=MissRule(transfer_min_tokens=16))
    assert mixed[HOST]["cpu_expert_pass"] == prompt[HOST]["cpu_expert_pass"] // 4096 * 8 * 15
    decode = memory_items(MIXTRAL, slots=0, on_accelerator=False, kv_tokens=2048, pass_tokens=1)
    assert decode[HOST]["cpu_expert_pass"] == prompt[HOST]["cpu_expert_pass"] // 2048
