"""The dense part's C decode operations give what transformers' own modules give (RMSNorm, attention of
one query, the MoE router), and they are only put in place where they do."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from runtime.decode_attention import cpu_decode_attention
from runtime.dense_norm import KernelRMSNorm, use_kernel_for_norms
from runtime.dense_router import MIN_CALLS, KernelRouter, use_kernel_for_routers
from runtime.kernels.decode_ops import load_decode_ops

ops = load_decode_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="no C compiler or no AVX2 on this CPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 1024), (5, 64), (3, 19)])
def test_rms_norm_equals_transformers(dtype, rows, hidden):
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    torch.manual_seed(0)
    norm = MixtralRMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
    x = (torch.randn(rows, hidden) * 3).to(dtype)
    theirs, ours = norm(x), ops.rms_norm(x, norm.weight, 1e-5)
    assert ours.dtype == dtype and ours.shape == theirs.shape
    if dtype == torch.bfloat16:  # same roundings: equal but where the fp32 sum of squares rounds differently
        assert (ours != theirs).float().mean() < 0.01
    assert torch.allclose(ours.float(), theirs.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


def test_norms_swapped_only_where_the_kernel_matches():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    model = torch.nn.ModuleDict({"llama_style": MixtralRMSNorm(32), "gemma_style": GemmaRMSNorm(32),
                                 "layer_norm": torch.nn.LayerNorm(32)})
    with torch.no_grad():
        for norm in model.values():
            norm.weight.normal_(0.5, 0.2)
    reference = copy.deepcopy(model["llama_style"])
    assert use_kernel_for_norms(model, ops) == 1
    assert isinstance(model["llama_style"], KernelRMSNorm)
    assert isinstance(model["gemma_style"], GemmaRMSNorm)  # weight used as 1 + w: another formula
    assert isinstance(model["layer_norm"], torch.nn.LayerNorm)
    with torch.no_grad():
        x = torch.randn(2, 3, 32)
        assert torch.allclose(model["llama_style"](x), reference(x), atol=1e-6)
        # an input the kernel does not take (a non-contiguous view) goes through the module's own forward
        view = torch.randn(32, 6).t()
        assert torch.allclose(model["llama_style"](view), reference(view), atol=1e-6)


def _sdpa(query, key, value):
    return F.scaled_dot_product_attention(query, key, value, enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(16, 8, 64), (4, 1, 80), (4, 4, 12)])
@pytest.mark.parametrize("length", [1, 5, 33, 300])
def test_one_query_attention_equals_sdpa(dtype, heads, kv_heads, dim, length):
    torch.manual_seed(length)
    query = torch.randn(1, heads, 1, dim).to(dtype)
    # a view of the first `length` positions of a longer buffer, as the growing KV cache hands them out
    keys = torch.randn(1, kv_heads, length + 7, dim).to(dtype)[:, :, :length]
    values = torch.randn(1, kv_heads, length + 7, dim).to(dtype)[:, :, :length]
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    ours, _ = cpu_decode_attention(module, query, keys, values, None, scaling=dim ** -0.5)
    theirs = _sdpa(query, keys, values).transpose(1, 2)
    assert ours.shape == theirs.shape == (1, 1, heads, dim)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(ours.float(), theirs.float(), rtol=tol, atol=tol)


def test_masked_or_batched_attention_is_sdpa_itself():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    query, keys, values = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    mask = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    mask[..., :3] = False
    ours, _ = cpu_decode_attention(module, query, keys, values, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, query, keys, values, mask, scaling=0.25)
    assert torch.equal(ours, theirs)
    batch = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    ours, _ = cpu_decode_attention(module, *batch, None, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, *batch, None, scaling=0.25)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "phimoe"])
def test_cpu_sessions_put_the_decode_ops_in_place(family, checkpoint):
    from model_factory import num_experts
    from test_conformance import PLANS, make_plan

    from runtime.session import Session

    folder, config = checkpoint(family)
    plan = make_plan(PLANS["all-cpu-1-thread"], num_experts(config), config.num_hidden_layers)
    model = Session.load(plan, folder).loaded.model
    norms = [m for m in model.modules() if isinstance(m, KernelRMSNorm)]
    if family == "phimoe":  # LayerNorm, not RMSNorm: nothing to swap
        assert not norms
    else:  # two per layer and the final norm (Qwen3-MoE adds the per-head q and k norms)
        assert len(norms) == config.num_hidden_layers * (4 if family == "qwen3_moe" else 2) + 1
    assert model.config._attn_implementation == "moeplan_cpu"
    routers = [m for m in model.modules() if isinstance(m, KernelRouter)]
    assert len(routers) == (0 if family == "phimoe" else config.num_hidden_layers)  # sparsemixer stays


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,length", [(16, 8, 64, 37), (4, 2, 16, 1), (4, 4, 12, 70)])
def test_native_step_ops_equal_torch_bit_for_bit(dtype, heads, kv_heads, dim, length):
    """The native decode step's fused calls: the residual add and RMSNorm, and rotary embedding + KV-cache
    append + attention, give the bits of torch's ops and of `rms_norm` / `attend_one` (runtime/native_decode.py)."""
    from transformers.models.mixtral.modeling_mixtral import apply_rotary_pos_emb

    torch.manual_seed(length)
    freqs = length * (1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim))
    emb = torch.cat((freqs, freqs))
    cos, sin = emb.cos().to(dtype).view(1, 1, dim), emb.sin().to(dtype).view(1, 1, dim)
    q, k, v = (torch.randn(1, 1, h, dim).to(dtype) for h in (heads, kv_heads, kv_heads))
    q_rot, k_rot = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    key_cache, value_cache = (torch.randn(1, kv_heads, length + 5, dim).to(dtype) for _ in range(2))
    keys = torch.cat([key_cache[:, :, :length], k_rot], 2)
    values = torch.cat([value_cache[:, :, :length], v.transpose(1, 2)], 2)
    expected = ops.attend_one(q_rot, keys, values, dim ** -0.5, 2)
    q2, k2 = q.reshape(heads, dim).clone(), k.reshape(kv_heads, dim).clone()
    out = ops.rope_append_attend(q2, k2, v.reshape(kv_heads, dim), cos.view(dim), sin.view(dim), key_cache,
                                 value_cache, length, dim ** -0.5, 2)
    assert torch.equal(q2, q_rot.transpose(1, 2).reshape(heads, dim))
    assert torch.equal(key_cache[:, :, :length + 1], keys) and torch.equal(value_cache[:, :, :length + 1], values)
    assert torch.equal(out, expected)
    a, b, weight = torch.randn(1, 1, 96).to(dtype), torch.randn(1, 1, 96).to(dtype), torch.randn(96).to(dtype)
    total, normed = ops.add_rms_norm(a, b, weight, 1e-5)
    assert torch.equal(total, a + b) and torch.equal(normed, ops.rms_norm(a + b, weight, 1e-5))


# ---- the router ---------------------------------------------------------------------------------
def _moe_model(family: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    from model_factory import make_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(make_config(family), dtype=dtype).eval()


def _routers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if name.endswith((".mlp.gate", ".mlp.router"))}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_router_logits_are_recorded_as_transformers_records_them(family):
    """`output_router_logits=True` records each replaced router (transformers matches routers by class),
    for one token (the kernel's call) and several (the module's own), and the model's aux loss follows."""
    model = _moe_model(family, torch.float32)
    reference = copy.deepcopy(model)
    assert use_kernel_for_routers(model, ops) == model.config.num_hidden_layers
    for name, router in _routers(model).items():
        original = _routers(reference)[name]
        assert isinstance(router, KernelRouter) and isinstance(router, type(original))
        assert getattr(router, "num_experts", None) == getattr(original, "num_experts", None)
    generator = torch.Generator().manual_seed(3)
    for tokens in (1, 5):
        ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator)
        with torch.no_grad():
            ours = model(input_ids=ids, output_router_logits=True)
            theirs = reference(input_ids=ids, output_router_logits=True)
        assert len(ours.router_logits) == len(theirs.router_logits) == model.config.num_hidden_layers
        for a, b in zip(ours.router_logits, theirs.router_logits):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        if theirs.aux_loss is not None:
            assert torch.allclose(ours.aux_loss, theirs.aux_loss, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_router_equals_transformers(family, dtype):
    model = _moe_model(family, dtype)
    theirs = _routers(model)
    assert use_kernel_for_routers(model, ops) == len(theirs) == model.config.num_hidden_layers
    ours = _routers(model)
    step = torch.finfo(dtype).eps
    generator = torch.Generator().manual_seed(1)
    compared = 0
    with torch.no_grad():
        for name, router in theirs.items():
            kernel_router = ours[name]
            assert isinstance(kernel_router, KernelRouter) and kernel_router.weight is router.weight
            for scale in (0.5, 1.0, 4.0):
                for _ in range(40):
                    x = (torch.randn(1, router.weight.shape[1], generator=generator) * scale).to(dtype)
                    logits, scores, index = router(x)
                    routed = ops.route_one(x, router.weight, index.shape[1], kernel_router.normalize, scores.dtype)
                    got = kernel_router(x)
                    if routed is None:  # tied: the module's own answer
                        assert all(torch.equal(a, b) for a, b in zip(got, (logits, scores, index)))
                        continue
                    assert torch.equal(got[2], index) and got[1].dtype == scores.dtype
                    assert torch.allclose(got[1].float(), scores.float(), rtol=max(4 * step, 2e-5), atol=0)
                    assert torch.allclose(got[0].float(), logits.float(), rtol=2 * step, atol=1e-5)
                    compared += 1
    assert compared > 300


def test_routers_with_another_rule_keep_their_forward():
    model = _moe_model("phimoe", torch.float32)  # sparsemixer: not softmax then top-k
    assert use_kernel_for_routers(model, ops) == 0

    class SigmoidRouter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, 32))

        def forward(self, x):
            logits = F.linear(x.reshape(-1, 32), self.weight)
            values, index = torch.topk(torch.sigmoid(logits.float()), 2, dim=-1)
            return logits, values, index

    block = torch.nn.Module()
    block.gate = SigmoidRouter()
    assert use_kernel_for_routers(block, ops) == 0 and isinstance(block.gate, SigmoidRouter)

    class Unnormalised(SigmoidRouter):  # softmax and top-k without renormalising: the kernel's other rule
        def forward(self, x):
            logits = F.linear(x.reshape(-1, 32), self.weight)
            values, index = torch.topk(torch.softmax(logits.float(), dim=-1), 2, dim=-1)
            return logits, values, index

    block.gate = Unnormalised()
    assert use_kernel_for_routers(block, ops) == 1 and block.gate.normalize is False


def test_tied_probabilities_fall_back_to_the_module():
    model = _moe_model("mixtral", torch.float32)
    name, router = next(iter(_routers(model).items()))
    with torch.no_grad():
        router.weight[2] = router.weight[1]  # experts 1 and 2 always score alike
    use_kernel_for_routers(model, ops)
    kernel_router = _routers(model)[name]
    x = router.weight[1:2].clone() * 3  # experts 1 and 2 on top, tied: torch orders them its own way
    assert ops.route_one(x, router.weight, 2, True, torch.float32) is None
    with torch.no_grad():
        for _ in range(MIN_CALLS):
            assert all(torch.equal(a, b) for a, b in zip(kernel_router(x), router(x)))
    assert not kernel_router.enabled  # every call tied: the kernel is no longer tried
