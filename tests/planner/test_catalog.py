"""Model catalog: published totals, config.json reading, and the errors a user sees."""
from __future__ import annotations

import json

import pytest

from planner.catalog import CATALOG, load_model_shape
from runtime.contracts.model_shape import ModelShape
from runtime.errors import ModelError, UserError

# Published parameter counts (model cards / papers), in billions.
PUBLISHED_B = {"mixtral-8x7b": 46.7, "mixtral-8x22b": 141.0, "phi-3.5-moe": 41.9, "qwen1.5-moe-a2.7b": 14.3,
               "qwen3-30b-a3b": 30.5, "olmoe-1b-7b": 6.9, "deepseek-v2-lite": 15.7, "gpt-oss-20b": 20.9}


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_parameter_totals_match_the_published_counts(name: str) -> None:
    assert CATALOG[name].total_params / 1e9 == pytest.approx(PUBLISHED_B[name], rel=0.01)


def test_mixtral_8x7b_bytes_in_bf16() -> None:
    s = load_model_shape("mixtral")  # the alias
    assert s.name == "mixtral-8x7b"
    assert s.total_bytes / 1e9 == pytest.approx(93.4, rel=0.005)
    assert s.expert_bytes == 3 * 4096 * 14336 * 2  # 352 MB: a bf16 Mixtral-8x7B expert
    assert s.kv_bytes_per_token == 2 * 8 * 128 * 32 * 2
    assert s.dense_bytes + s.num_moe_layers * s.num_experts * s.expert_bytes == s.total_bytes


def test_gpt_oss_ships_mxfp4_experts() -> None:
    s = load_model_shape("gpt-oss-20b")
    # 4.25 bits per expert weight: the whole checkpoint is about 13.8 GB, not the 42 GB of bf16.
    assert 13.0e9 < s.total_bytes < 14.5e9
    bf16 = load_model_shape("gpt-oss-20b", dtype="bfloat16")
    assert bf16.expert_bytes > 3.5 * s.expert_bytes
    assert bf16.total_params == s.total_params


def test_deepseek_v2_lite_has_a_dense_first_layer_and_mla_cache() -> None:
    s = load_model_shape("deepseek-v2-lite")
    assert s.moe_layers[0] == 1 and s.num_moe_layers == 26
    assert s.dense_params_per_layer[0] > 3 * s.hidden * s.dense_intermediate
    # MLA as transformers caches it: per-head keys of 192 and values of 128, 16 heads, 27 layers.
    assert s.kv_bytes_per_token == 16 * (192 + 128) * 27 * 2


def test_dtype_override_changes_every_weight() -> None:
    f32 = load_model_shape("olmoe-1b-7b", dtype="float32")
    assert f32.total_bytes == pytest.approx(2 * load_model_shape("olmoe-1b-7b").total_bytes, rel=1e-6)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ModelError) as err:
        load_model_shape("mixtral-9x9b")
    assert isinstance(err.value, UserError)
    assert "mixtral-9x9b" in str(err.value) and "olmoe-1b-7b" in str(err.value) and "mixtral (= mixtral-8x7b)" in str(err.value)


def _write(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_mixtral_config_folder(tmp_path) -> None:
    d = _write(tmp_path, {"model_type": "mixtral", "hidden_size": 1024, "intermediate_size": 3584,
                          "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 8,
                          "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
                          "tie_word_embeddings": False, "torch_dtype": "bfloat16"})
    s = load_model_shape(str(d))
    assert (s.num_layers, s.num_experts, s.top_k, s.head_dim) == (8, 8, 2, 64)
    assert s.expert_bytes == 3 * 1024 * 3584 * 2
    # The benchmark model of bench/: its experts weigh about 1.4 GB.
    assert s.expert_bytes_total == 64 * 3 * 1024 * 3584 * 2


def test_qwen2_moe_sparse_step_and_mlp_only_layers(tmp_path) -> None:
    d = _write(tmp_path, {"model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 96,
                          "moe_intermediate_size": 48, "shared_expert_intermediate_size": 80,
                          "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 512,
                          "decoder_sparse_step": 2, "mlp_only_layers": [3], "torch_dtype": "float32"})
    s = load_model_shape(str(d))
    assert s.moe_layers == (1, 5)  # (i + 1) % 2 == 0 and not in mlp_only_layers
    assert s.shared_expert_intermediate == 80 and s.dense_intermediate == 96
    per_layer = s.dense_params_per_layer
    assert per_layer[0] - per_layer[1] == 3 * 64 * 96 - 3 * 64 * 80 - 64 * 8  # dense MLP vs shared + router


@pytest.mark.parametrize("family,extra", [
    ("olmoe", {"intermediate_size": 48, "num_experts": 16}),
    ("phimoe", {"intermediate_size": 96, "num_local_experts": 8}),
    ("qwen3_moe", {"intermediate_size": 96, "moe_intermediate_size": 48, "num_experts": 16, "head_dim": 16}),
])
def test_other_families(tmp_path, family: str, extra: dict) -> None:
    d = _write(tmp_path, {"model_type": family, "hidden_size": 64, "num_hidden_layers": 3,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts_per_tok": 2,
                          "vocab_size": 512, "torch_dtype": "float32", **extra})
    s = load_model_shape(str(d))
    assert s.moe_layers == (0, 1, 2) and s.dtype == "float32"
    assert s.num_experts == extra.get("num_experts", extra.get("num_local_experts"))


def test_config_errors_name_the_file_and_field(tmp_path) -> None:
    with pytest.raises(ModelError, match="model_type"):
        load_model_shape(str(_write(tmp_path, {"model_type": "llama"})))
    with pytest.raises(ModelError, match=r"config.json: hidden_size: must be an integer, got '1024'"):
        load_model_shape(str(_write(tmp_path, {"model_type": "mixtral", "hidden_size": "1024"})))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model_shape(str(empty))


def test_shape_rejects_impossible_values() -> None:
    base = CATALOG["olmoe-1b-7b"]
    with pytest.raises(ModelError, match="top_k 65 exceeds num_experts 64"):
        ModelShape(**{**base.__dict__, "top_k": 65})
    with pytest.raises(ModelError, match="moe_layers"):
        ModelShape(**{**base.__dict__, "moe_layers": (16,)})
