"""The shape of a MoE model: what both sides need to know about it, from a config.json or the catalog.

One definition for the runtime (its memory guard checks a plan against it before any weight is read) and
the planner (the cost model and the tuner work from these numbers alone). Pure Python (no torch): a
shape says how many bytes an expert and the dense part weigh and how many bytes of KV cache a token
costs; it never loads weights. The readers below take the fields of a transformers config.json; the
tests check their byte counts against the model transformers builds from the same config.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ModelError
from . import expert_format as formats

# Bytes per stored weight. mxfp4 (gpt-oss experts): 4-bit values plus one 8-bit scale per block of 32,
# i.e. 4.25 bits per weight.
DTYPE_BYTES: dict[str, float] = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "mxfp4": 4.25 / 8}


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int  # decoder layers, dense and sparse
    moe_layers: tuple[int, ...]  # indices of the sparse (MoE) decoder layers, in model order
    num_experts: int  # routed experts per MoE layer
    top_k: int  # experts each token chooses per MoE layer
    hidden: int
    expert_intermediate: int  # intermediate size of one routed expert
    shared_expert_intermediate: int  # total intermediate of the always-on shared expert(s); 0 if none
    dense_intermediate: int  # intermediate of the MLP of dense (non-MoE) layers; 0 if none
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    dtype: str  # dtype of the dense weights and the activations (and of the experts unless expert_dtype)
    gated: bool = True  # expert FFN has 3 matrices (gate, up, down) rather than 2
    # experts stored in another format: a float dtype, int8 or int4 (runtime/contracts/expert_format.py),
    # or gpt-oss's mxfp4; None = dtype
    expert_dtype: str | None = None
    expert_group_size: int = formats.DEFAULT_GROUP_SIZE  # inputs per scale of int8/int4 experts
    expert_bias: bool = False  # experts carry biases (gpt-oss)
    attention_bias: bool = False  # q/k/v (and o) projections carry biases
    # Attention that is not plain multi-head/GQA (DeepSeek's MLA): its weights per layer and the values
    # the KV cache keeps per token and layer, computed in the catalog entry; 0 = derive from the heads.
    attention_params_override: int = 0
    kv_values_override: int = 0
    qk_norm_params: int = 0  # per attention layer: weights of norms on q and k (Qwen3 per head, OLMoE whole)
    norm_bias: bool = False  # the norms are LayerNorms with a bias (PhiMoE): 2 x hidden each

    def __post_init__(self) -> None:
        for field_name in ("num_layers", "num_experts", "top_k", "hidden", "expert_intermediate", "num_heads",
                           "num_kv_heads", "head_dim", "vocab"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value <= 0:
                raise ModelError(f"model {self.name}: {field_name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ModelError(f"model {self.name}: dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        experts = self.expert_dtype or self.dtype
        if experts not in DTYPE_BYTES and not formats.is_quantized(experts):
            raise ModelError(f"model {self.name}: expert format must be one of "
                             f"{', '.join((*DTYPE_BYTES, *formats.INT_FORMATS))}, got {experts!r}")
        if formats.is_quantized(experts):
            problem = formats.check_group_size(self.expert_group_size)
            if problem:
                raise ModelError(f"model {self.name}: expert group size {problem}")
        if not self.moe_layers or any(not 0 <= i < self.num_layers for i in self.moe_layers):
            raise ModelError(f"model {self.name}: moe_layers must be indices below {self.num_layers}, "
                             f"got {list(self.moe_layers)}")
        if self.top_k > self.num_experts:
            raise ModelError(f"model {self.name}: top_k {self.top_k} exceeds num_experts {self.num_experts}")

    # ---- derived counts -----------------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def dtype_bytes(self) -> float:
        return DTYPE_BYTES[self.dtype]

    @property
    def expert_params(self) -> int:
        """Weights of one routed expert (biases included)."""
        matrices = 3 if self.gated else 2
        weights = matrices * self.hidden * self.expert_intermediate
        biases = ((2 if self.gated else 1) * self.expert_intermediate + self.hidden) if self.expert_bias else 0
        return weights + biases

    @property
    def expert_format(self) -> str:
        """How the routed experts are stored: a float dtype, int8, int4 (or gpt-oss's mxfp4)."""
        return self.expert_dtype or self.dtype

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert as stored (what a cache slot holds and a miss reads)."""
        matrices = 3 if self.gated else 2
        weights = matrices * self.hidden * self.expert_intermediate
        biases = self.expert_params - weights
        # Biases of quantised experts stay in the dense dtype (gpt-oss ships them in bf16).
        fmt = self.expert_format
        if formats.is_quantized(fmt):
            stored = formats.expert_bytes(fmt, self.hidden, self.expert_intermediate, self.gated,
                                                self.expert_group_size)
        else:
            stored = weights * DTYPE_BYTES[fmt]
        return round(stored + biases * self.dtype_bytes)

    @property
    def expert_bytes_in_dtype(self) -> int:
        """Bytes of one routed expert in the activation dtype: what a quantized expert dequantizes into."""
        return round(self.expert_params * self.dtype_bytes)

    @property
    def attention_params(self) -> int:
        """Weights of one layer's attention block (projections, biases)."""
        if self.attention_params_override:
            return self.attention_params_override
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        weights = self.hidden * (q + 2 * kv) + q * self.hidden
        biases = (q + 2 * kv + self.hidden) if self.attention_bias else 0
        return weights + biases

    @property
    def dense_params_per_layer(self) -> list[int]:
        """Non-expert weights of each decoder layer: attention, norms, router, shared or dense MLP."""
        moe = set(self.moe_layers)
        matrices = 3 if self.gated else 2
        out = []
        for i in range(self.num_layers):
            n = self.attention_params + 2 * self.norm_params + self.qk_norm_params  # two norms per layer
            if i in moe:
                n += self.hidden * self.num_experts  # router
                if self.shared_expert_intermediate:
                    n += matrices * self.hidden * self.shared_expert_intermediate
            else:
                n += matrices * self.hidden * self.dense_intermediate
            out.append(n)
        return out

    @property
    def embedding_params(self) -> int:
        """Input embeddings, final norm and lm_head (which shares the embeddings when tied)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.norm_params

    @property
    def norm_params(self) -> int:
        """Weights of one hidden-size norm (RMSNorm: a scale; LayerNorm with bias: scale and bias)."""
        return self.hidden * (2 if self.norm_bias else 1)

    @property
    def dense_params(self) -> int:
        return sum(self.dense_params_per_layer) + self.embedding_params

    @property
    def total_params(self) -> int:
        return self.dense_params + self.num_moe_layers * self.num_experts * self.expert_params

    @property
    def dense_bytes(self) -> int:
        """Bytes of everything but the routed experts: embeddings, attention, norms, routers, shared
        experts, dense MLPs, lm_head."""
        return round(self.dense_params * self.dtype_bytes)

    @property
    def expert_bytes_total(self) -> int:
        return self.num_moe_layers * self.num_experts * self.expert_bytes

    @property
    def total_bytes(self) -> int:
        return self.dense_bytes + self.expert_bytes_total

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token of context costs, over all layers (in the activation dtype)."""
        per_layer = self.kv_values_override or 2 * self.num_kv_heads * self.head_dim
        return round(per_layer * self.num_layers * self.dtype_bytes)

    def with_dtype(self, dtype: str) -> "ModelShape":
        """The same model held in `dtype` (every weight, experts included: what the runtime loads)."""
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ModelError(f"model {self.name}: dtype must be float32, bfloat16 or float16, got {dtype!r}")
        return replace(self, dtype=dtype, expert_dtype=None)

    def with_experts(self, fmt: str, group_size: int = formats.DEFAULT_GROUP_SIZE) -> "ModelShape":
        """The same model with its routed experts stored in `fmt` (a plan's `model.experts`); a float
        format equal to the dtype is the plain model."""
        problem = formats.check_format(fmt)
        if problem:
            raise ModelError(f"model {self.name}: expert format {problem}")
        return replace(self, expert_dtype=None if fmt == self.dtype else fmt, expert_group_size=group_size)


def all_layers(n: int) -> tuple[int, ...]:
    return tuple(range(n))


def mla_sizes(hidden: int, heads: int, q_lora_rank: int | None, kv_lora_rank: int, nope: int, rope: int,
         v_dim: int) -> tuple[int, int]:
    """DeepSeek MLA: (attention weights per layer, KV values cached per token and layer).

    Weights: q_proj (or q_a/q_b with a LoRA rank), kv_a_proj_with_mqa (latent + shared rope key),
    kv_a_layernorm, kv_b_proj (latent -> per-head key and value), o_proj. The transformers
    implementation caches the decompressed per-head keys (nope + rope) and values, not the latent.
    """
    q_dim = heads * (nope + rope)
    q = hidden * q_dim if not q_lora_rank else hidden * q_lora_rank + q_lora_rank + q_lora_rank * q_dim
    kv_a = hidden * (kv_lora_rank + rope) + kv_lora_rank
    kv_b = kv_lora_rank * heads * (nope + v_dim)
    o = heads * v_dim * hidden
    return q + kv_a + kv_b + o, heads * (nope + rope) + heads * v_dim


# ---- config.json of the transformers families --------------------------------------------------
def shape_from_config(path: Path) -> ModelShape:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: no config.json in the checkpoint folder") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read as JSON ({exc})") from None
    except RecursionError:
        raise ModelError(f"{path}: cannot read as JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: must be a JSON object")
    family = config.get("model_type")
    readers = {"mixtral": _mixtral, "phimoe": _mixtral, "qwen2_moe": _qwen_moe, "qwen3_moe": _qwen_moe,
               "olmoe": _olmoe, "deepseek_v2": _deepseek_v2, "gpt_oss": _gpt_oss}
    if not isinstance(family, str) or family not in readers:
        raise ModelError(f"{path}: model_type: moeplan knows {', '.join(sorted(readers))}, got {family!r}")
    get = _Getter(config, path)
    return readers[family](get, path.parent.name or str(path.parent))


class _Getter:
    """Reads config fields, naming the file and field in errors."""

    def __init__(self, config: dict[str, Any], path: Path) -> None:
        self.config, self.path = config, path

    def int(self, key: str, default: int | None = None) -> int:
        value = self.config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelError(f"{self.path}: {key}: must be an integer, got {value!r}")
        return value

    def opt(self, key: str, default: Any = None) -> Any:
        value = self.config.get(key)
        return default if value is None else value

    def dtype(self) -> str:
        value = self.config.get("torch_dtype") or self.config.get("dtype") or "bfloat16"
        if value not in ("float32", "bfloat16", "float16"):
            raise ModelError(f"{self.path}: torch_dtype: must be float32, bfloat16 or float16, got {value!r}")
        return value

    def common(self) -> dict[str, Any]:
        hidden, heads = self.int("hidden_size"), self.int("num_attention_heads")
        if heads < 1:  # divides hidden_size below
            raise ModelError(f"{self.path}: num_attention_heads: must be a positive integer, got {heads}")
        layers = self.int("num_hidden_layers")
        if not 1 <= layers <= 100_000:  # a sanity bound, not a model fact: the layer tuples are built in memory
            raise ModelError(f"{self.path}: num_hidden_layers: must be in 1..100000, got {layers}")
        return dict(num_layers=layers, hidden=hidden, num_heads=heads,
                    num_kv_heads=self.int("num_key_value_heads", heads),
                    head_dim=self.int("head_dim") if self.config.get("head_dim") else hidden // heads,
                    vocab=self.int("vocab_size"), tied_embeddings=bool(self.opt("tie_word_embeddings", False)),
                    dtype=self.dtype())


def _every_layer_sparse(experts_key: str):
    """Reader for families whose every decoder layer is sparse (Mixtral, PhiMoE: `num_local_experts`;
    OLMoE: `num_experts`), with the expert size in `intermediate_size`."""
    def read(get: _Getter, name: str) -> ModelShape:
        c = get.common()
        return ModelShape(name=name, moe_layers=all_layers(c["num_layers"]), num_experts=get.int(experts_key),
                          top_k=get.int("num_experts_per_tok"), expert_intermediate=get.int("intermediate_size"),
                          shared_expert_intermediate=0, dense_intermediate=0,
                          attention_bias=bool(get.opt("attention_bias", False)), **c)
    return read


def _mixtral(get: _Getter, name: str) -> ModelShape:
    shape = _every_layer_sparse("num_local_experts")(get, name)
    # PhiMoE's norms are LayerNorms with a bias
    return replace(shape, norm_bias=True) if get.config.get("model_type") == "phimoe" else shape


def _olmoe(get: _Getter, name: str) -> ModelShape:
    shape = _every_layer_sparse("num_experts")(get, name)
    # OLMoE normalises the whole q and k projections' outputs
    return replace(shape, qk_norm_params=(shape.num_heads + shape.num_kv_heads) * shape.head_dim)


def _qwen_moe(get: _Getter, name: str) -> ModelShape:
    c = get.common()
    layers = c["num_layers"]
    step = get.int("decoder_sparse_step", 1)
    mlp_only = get.opt("mlp_only_layers", [])
    if not isinstance(mlp_only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in mlp_only):
        raise ModelError(f"{get.path}: mlp_only_layers: must be a list of layer indices, got {mlp_only!r}"[:300])
    mlp_only = set(mlp_only)
    # transformers: layer i is sparse when it is not in mlp_only_layers, num_experts > 0 and
    # (i + 1) % decoder_sparse_step == 0.
    moe = tuple(i for i in range(layers) if i not in mlp_only and step > 0 and (i + 1) % step == 0)
    qwen2 = get.config.get("model_type") == "qwen2_moe"
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts; earlier configs say num_experts
    experts_key = "num_experts" if "num_experts" in get.config else "num_local_experts"
    return ModelShape(name=name, moe_layers=moe, num_experts=get.int(experts_key),
                      top_k=get.int("num_experts_per_tok"), expert_intermediate=get.int("moe_intermediate_size"),
                      shared_expert_intermediate=get.int("shared_expert_intermediate_size", 0) if qwen2 else 0,
                      dense_intermediate=get.int("intermediate_size") if len(moe) < layers else 0,
                      attention_bias=qwen2 or bool(get.opt("attention_bias", False)),
                      qk_norm_params=0 if qwen2 else 2 * c["head_dim"], **c)


def _deepseek_v2(get: _Getter, name: str) -> ModelShape:
    c = get.common()
    layers = c["num_layers"]
    first_dense = get.int("first_k_dense_replace", 0)
    step = get.int("moe_layer_freq", 1)
    moe = tuple(i for i in range(layers) if i >= first_dense and i % step == 0)
    attn, kv = mla_sizes(c["hidden"], c["num_heads"], get.opt("q_lora_rank"), get.int("kv_lora_rank"),
                    get.int("qk_nope_head_dim"), get.int("qk_rope_head_dim"), get.int("v_head_dim"))
    moe_i = get.int("moe_intermediate_size")
    return ModelShape(name=name, moe_layers=moe, num_experts=get.int("n_routed_experts"),
                      top_k=get.int("num_experts_per_tok"), expert_intermediate=moe_i,
                      shared_expert_intermediate=moe_i * get.int("n_shared_experts", 0),
                      dense_intermediate=get.int("intermediate_size") if len(moe) < layers else 0,
                      attention_params_override=attn, kv_values_override=kv, **c)


def _gpt_oss(get: _Getter, name: str) -> ModelShape:
    c = get.common()
    quant = get.opt("quantization_config", {})
    return ModelShape(name=name, moe_layers=all_layers(c["num_layers"]), num_experts=get.int("num_local_experts"),
                      top_k=get.int("num_experts_per_tok", get.opt("experts_per_token", 0)),
                      expert_intermediate=get.int("intermediate_size"), shared_expert_intermediate=0,
                      dense_intermediate=0, expert_bias=True, attention_bias=True,
                      expert_dtype="mxfp4" if isinstance(quant, dict) and quant.get("quant_method") == "mxfp4" else None,
                      **c)
