"""Small random MoE checkpoints of real transformers families, saved and reloaded like real ones.

Routers are scaled up so that routing is decisive (no near-ties that float rounding could flip).
"""
from __future__ import annotations

from pathlib import Path

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe")
CORPUS = ("import os\nimport sys\n\ndef main(argv):\n    for name in os.listdir(argv[1]):\n"
          "        print(name)\n    return 0\n\nclass Cache:\n    def __init__(self, size):\n"
          "        self.size = size\n        self.items = {}\n") * 10


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def make_config(family: str, layers: int = 3, **overrides):
    """`overrides` replace the family's config fields (quantized-expert tests need input sizes that the
    default group size divides)."""
    config = _family_config(family, layers)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def mixtral_experts(dtype):
    """A standalone Mixtral experts module (make_config("mixtral")) with small random weights, seeded: what
    the executor and kernel tests run experts on. Returns (module, config)."""
    import torch
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    torch.manual_seed(0)
    config = make_config("mixtral")
    module = MixtralExperts(config).to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.05)
    return module, config


def _family_config(family: str, layers: int):
    import transformers as tf

    common = dict(vocab_size=320, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
                  tie_word_embeddings=False)
    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2, **common)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                                 num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                                 decoder_sparse_step=1, **common)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=48, num_experts=16,
                                 num_experts_per_tok=4, norm_topk_prob=True, head_dim=16, **common)
    if family == "olmoe":
        return tf.OlmoeConfig(intermediate_size=48, num_experts=16, num_experts_per_tok=4, **common)
    if family == "phimoe":
        return tf.PhimoeConfig(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2, **common)
    raise ValueError(f"unknown family {family!r}")


def num_experts(config) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts


def build_checkpoint(family: str, folder: Path, seed: int = 0, layers: int = 3, **overrides):
    """Write a random checkpoint of `family` (safetensors, config, tokenizer) to folder; return its config."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(family, layers, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    experts = num_experts(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (name.endswith("gate.weight") or name.endswith("router.weight")) and p.dim() == 2 \
                    and p.shape[0] == experts:
                p.mul_(8.0)
    model.save_pretrained(folder)
    make_tokenizer(folder)
    return config
