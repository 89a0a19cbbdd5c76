"""The model catalog: shapes of known MoE models by name, and `load_model_shape` for a name or a folder.

The shape itself (`ModelShape`, and reading one from a config.json) is a contract shared with the
runtime: runtime/contracts/model_shape.py. Pure Python (no torch). Every catalog figure comes from the model's `config.json` on its Hugging Face page
(named beside each entry); parameter totals quoted in the tests come from the model cards / papers.
"""
from __future__ import annotations

from pathlib import Path

from runtime.contracts.model_shape import ModelShape, all_layers, mla_sizes, shape_from_config
from runtime.errors import ModelError



_DSV2_LITE_ATTN, _DSV2_LITE_KV = mla_sizes(2048, 16, None, 512, 128, 64, 128)

CATALOG: dict[str, ModelShape] = {
    # mistralai/Mixtral-8x7B-v0.1 config.json; 46.7B parameters (Mistral AI, "Mixtral of Experts").
    "mixtral-8x7b": ModelShape(
        name="mixtral-8x7b", num_layers=32, moe_layers=all_layers(32), num_experts=8, top_k=2, hidden=4096,
        expert_intermediate=14336, shared_expert_intermediate=0, dense_intermediate=0, num_heads=32,
        num_kv_heads=8, head_dim=128, vocab=32000, tied_embeddings=False, dtype="bfloat16"),
    # mistralai/Mixtral-8x22B-Instruct-v0.1 config.json (vocab 32768); 141B parameters (model card).
    "mixtral-8x22b": ModelShape(
        name="mixtral-8x22b", num_layers=56, moe_layers=all_layers(56), num_experts=8, top_k=2, hidden=6144,
        expert_intermediate=16384, shared_expert_intermediate=0, dense_intermediate=0, num_heads=48,
        num_kv_heads=8, head_dim=128, vocab=32768, tied_embeddings=False, dtype="bfloat16"),
    # microsoft/Phi-3.5-MoE-instruct config.json (attention_bias true); 41.9B parameters (model card).
    "phi-3.5-moe": ModelShape(
        name="phi-3.5-moe", num_layers=32, moe_layers=all_layers(32), num_experts=16, top_k=2, hidden=4096,
        expert_intermediate=6400, shared_expert_intermediate=0, dense_intermediate=0, num_heads=32,
        num_kv_heads=8, head_dim=128, vocab=32064, tied_embeddings=False, dtype="bfloat16",
        attention_bias=True, norm_bias=True),
    # Qwen/Qwen1.5-MoE-A2.7B config.json: 60 experts of 1408, one shared expert of 5632, qkv bias;
    # 14.3B parameters (model card).
    "qwen1.5-moe-a2.7b": ModelShape(
        name="qwen1.5-moe-a2.7b", num_layers=24, moe_layers=all_layers(24), num_experts=60, top_k=4, hidden=2048,
        expert_intermediate=1408, shared_expert_intermediate=5632, dense_intermediate=0, num_heads=16,
        num_kv_heads=16, head_dim=128, vocab=151936, tied_embeddings=False, dtype="bfloat16",
        attention_bias=True),
    # Qwen/Qwen3-30B-A3B config.json (head_dim 128, 4 KV heads); 30.5B parameters (model card).
    "qwen3-30b-a3b": ModelShape(
        name="qwen3-30b-a3b", num_layers=48, moe_layers=all_layers(48), num_experts=128, top_k=8, hidden=2048,
        expert_intermediate=768, shared_expert_intermediate=0, dense_intermediate=0, num_heads=32,
        num_kv_heads=4, head_dim=128, vocab=151936, tied_embeddings=False, dtype="bfloat16", qk_norm_params=2 * 128),
    # allenai/OLMoE-1B-7B-0924 config.json; 6.9B parameters (OLMoE paper).
    "olmoe-1b-7b": ModelShape(
        name="olmoe-1b-7b", num_layers=16, moe_layers=all_layers(16), num_experts=64, top_k=8, hidden=2048,
        expert_intermediate=1024, shared_expert_intermediate=0, dense_intermediate=0, num_heads=16,
        num_kv_heads=16, head_dim=128, vocab=50304, tied_embeddings=False, dtype="bfloat16",
        qk_norm_params=2 * 16 * 128),
    # deepseek-ai/DeepSeek-V2-Lite config.json: layer 0 is dense (first_k_dense_replace 1, intermediate
    # 10944), 64 routed experts of 1408 plus 2 shared (2 x 1408), MLA attention (kv_lora_rank 512, no
    # q LoRA, qk_nope 128, qk_rope 64, v 128); 15.7B parameters (DeepSeek-V2 paper).
    "deepseek-v2-lite": ModelShape(
        name="deepseek-v2-lite", num_layers=27, moe_layers=tuple(range(1, 27)), num_experts=64, top_k=6,
        hidden=2048, expert_intermediate=1408, shared_expert_intermediate=2 * 1408, dense_intermediate=10944,
        num_heads=16, num_kv_heads=16, head_dim=128, vocab=102400, tied_embeddings=False, dtype="bfloat16",
        attention_params_override=_DSV2_LITE_ATTN, kv_values_override=_DSV2_LITE_KV),
    # openai/gpt-oss-20b config.json: 32 experts of 2880 with biases, shipped in MXFP4; attention with
    # biases (64 heads of 64, 8 KV heads); dense weights bf16; 21B parameters (model card).
    "gpt-oss-20b": ModelShape(
        name="gpt-oss-20b", num_layers=24, moe_layers=all_layers(24), num_experts=32, top_k=4, hidden=2880,
        expert_intermediate=2880, shared_expert_intermediate=0, dense_intermediate=0, num_heads=64,
        num_kv_heads=8, head_dim=64, vocab=201088, tied_embeddings=False, dtype="bfloat16",
        expert_dtype="mxfp4", expert_bias=True, attention_bias=True),
}
ALIASES = {"mixtral": "mixtral-8x7b"}


def known_names() -> list[str]:
    return sorted(CATALOG) + [f"{a} (= {n})" for a, n in sorted(ALIASES.items())]


def load_model_shape(name_or_dir: str, dtype: str | None = None, experts: str | None = None) -> ModelShape:
    """A catalog name (or alias) or a checkpoint folder with a config.json; `dtype` overrides the
    stored dtype for every weight (what the runtime holds when the plan says `model.dtype`), and `experts`
    then the routed experts' storage (a plan's `model.experts`: a float dtype, int8 or int4, whose bytes
    per expert come from runtime/contracts/expert_format.py)."""
    key = name_or_dir.strip().lower()
    if key in CATALOG or key in ALIASES:
        shape = CATALOG[ALIASES.get(key, key)]
    else:
        folder = Path(name_or_dir).expanduser()
        if folder.is_dir():
            shape = shape_from_config(folder / "config.json")
        elif folder.name == "config.json" and folder.is_file():
            shape = shape_from_config(folder)
        else:
            raise ModelError(f"{name_or_dir}: not a known model nor a checkpoint folder "
                             f"(known: {', '.join(known_names())})")
    if dtype is not None:
        shape = shape.with_dtype(dtype)
    return shape if experts is None else shape.with_experts(experts)
