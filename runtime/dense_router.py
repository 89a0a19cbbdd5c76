"""The MoE router on the CPU at decode in one C call instead of seven torch ops.

With `accelerator: cpu` each MoE layer runs its router once per token: in transformers a linear, an
upcast, a softmax, a top-k, a sum and a division (Mixtral, Qwen2/3-MoE and OLMoE write it alike), each a
dispatched op. The C version (`route_one` in runtime/kernels/decode_ops.c) does the same arithmetic in one
call. Measured on the AVX2 development machine: about 25-45 µs per call against 45-110 µs for the module,
and, side by side in one process over 30 pairs of generations with the benchmark model, 0.991 of the
decode time with the module's own forward (bench/results/decode_ab_router_avx2.md): within that shared
VM's noise, so it was removed on 2026-12-07. On the AMD Zen 4 machine the module's forward took 104 µs a
call inside the decode (its torch operations run with the caches the kernels' streaming has emptied), and
the C call back: 0.939 of the decode time in bf16 and 0.949 with int4 experts, faster in 9 of 12 pairs
each (bench/results/decode_ab_c_router_*_zen4.md). It matters where per-token overhead does, on small
models and fast hosts; on Mixtral-sized ones the experts' weights dwarf it.

Each router whose output equals the kernel's on a probe is replaced by a `KernelRouter` holding the same
weight, as `KernelRMSNorm` replaces the norms: whether the top values are renormalised and in which dtype
they come back are read off the module's own output, not assumed. A router with another rule (PhiMoE's
sparsemixer, a bias, a sigmoid gate) fails the probe and keeps its own forward; so does any call the kernel
does not take (more than one token, tied probabilities). transformers records router logits
(`output_router_logits=True`, which Mixtral's forward also turns into its load-balancing loss) by the
router's class, so the replacement is an instance of a subclass of both `KernelRouter` and the class it
replaces, holding the module's own plain attributes too: without that, such a call recorded nothing and
the loss failed on the empty tuple.
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import torch

from .kernels.decode_ops import DTYPES, DecodeOps

ROUTER_NAMES = ("gate", "router")  # the MoE block's attribute that holds its router
MIN_CALLS, TIE_LIMIT = 64, 10  # after MIN_CALLS calls, more than 1 in TIE_LIMIT tied turns the kernel off


class KernelRouter(torch.nn.Module):
    def __init__(self, router: torch.nn.Module, ops: DecodeOps, top_k: int, normalize: bool,
                 scores_dtype: torch.dtype) -> None:
        torch.nn.Module.__init__(self)  # not the router class's own __init__ (see kernel_router_class)
        # the module's plain attributes (top_k, num_experts, ...), for code that reads them off the router
        vars(self).update({k: v for k, v in vars(router).items()
                           if not k.startswith("_") and not isinstance(v, (torch.Tensor, torch.nn.Module))})
        self.weight = router.weight  # shared, not copied
        vars(self)["_weight"] = router.weight  # a plain alias: Module.__getattr__ costs more per call
        self.top_k, self.normalize, self.scores_dtype = top_k, normalize, scores_dtype
        self.ops = ops
        self._own_forward = router.forward  # for calls the kernel does not take (kept out of the module tree)
        self.calls = self.ties = 0
        self.enabled = True

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = self._weight
        if self.enabled and hidden_states.numel() == w.shape[1] and hidden_states.dtype is w.dtype \
                and hidden_states.is_cpu and hidden_states.is_contiguous() and w.is_contiguous():
            routed = self.ops.route_one(hidden_states, w, self.top_k, self.normalize, self.scores_dtype)
            self.calls += 1
            if routed is not None:
                return routed
            self.ties += 1
            # Ties are rare with a few experts (Mixtral in bf16: about 1 call in 100) but common with many
            # in bf16 (128 experts, top 8: about 1 in 4, measured on random routers), where running the
            # kernel and then the module costs more than the module alone: stop trying there.
            if self.calls >= MIN_CALLS and self.ties * TIE_LIMIT > self.calls:
                self.enabled = False
        return self._own_forward(hidden_states)


def _kernel_rule(router: torch.nn.Module, ops: DecodeOps) -> tuple[int, bool, torch.dtype] | None:
    """(top k, renormalised, scores dtype) under which the kernel reproduces the router on a probe of a few
    tokens, or None: the same experts in the same order, scores and logits equal up to the rounding of sums."""
    weight = router.weight
    hidden = weight.shape[1]
    # not seed 0: a router drawn from seed 0 (as test models are) would have the probe's rows as its own
    generator = torch.Generator().manual_seed(1234)
    # logits of a spread like a trained router's (standard deviation up to 2): saturated probabilities
    # would tie at zero and give no verdict
    scale = 2.0 / max(float(weight.detach().float().norm(dim=1).max()), 1e-6)
    probe = (torch.randn(4, hidden, generator=generator) * scale).to(weight.dtype)
    with torch.no_grad():
        try:
            theirs = router(probe)
        except Exception:  # a router that does not take this shape is not one the kernel computes
            return None
        if not (isinstance(theirs, tuple) and len(theirs) == 3 and all(isinstance(t, torch.Tensor) for t in theirs)):
            return None
        logits, scores, index = theirs
        if index.dim() != 2 or index.shape[0] != 4 or scores.shape != index.shape or logits.dtype != weight.dtype:
            return None
        k = index.shape[1]
        for normalize in (True, False):
            compared = 0
            for row in range(4):
                ours = ops.route_one(probe[row:row + 1].contiguous(), weight, k, normalize, scores.dtype)
                if ours is None:  # a tie on this row: no verdict
                    continue
                # fp32 sums in another order: up to a rounding step of bf16, or 1e-5 relative in fp32
                # (over 4096 products the two orders differ by about 1e-6 of the logits' size)
                tol = max(2 * torch.finfo(weight.dtype).eps, 1e-5)
                spread = max(float(logits[row].float().abs().max()), 1.0)
                same = (torch.equal(ours[2], index[row:row + 1])
                        and torch.allclose(ours[1].float(), scores[row:row + 1].float(), rtol=2 * tol, atol=0.0)
                        and torch.allclose(ours[0].float(), logits[row:row + 1].float(), rtol=tol, atol=tol * spread))
                if not same:
                    break
                compared += 1
            else:
                if compared >= 2:
                    return k, normalize, scores.dtype
    return None


@lru_cache(maxsize=None)
def kernel_router_class(router_class: type) -> type:
    """`KernelRouter` that is also a `router_class`: transformers' output recording matches by class."""
    return type(f"Kernel{router_class.__name__}", (KernelRouter, router_class), {})


def routers(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Each MoE router of `model` as (its block, the block's attribute holding it, the router): a module under
    one of ROUTER_NAMES with a two-dimensional [experts, hidden] weight."""
    for parent in list(model.modules()):
        for name in ROUTER_NAMES:
            child = parent._modules.get(name)
            weight = getattr(child, "weight", None)
            if child is not None and isinstance(weight, torch.Tensor) and weight.dim() == 2:
                yield parent, name, child


def use_kernel_for_routers(model: torch.nn.Module, ops: DecodeOps | None) -> int:
    """Replace each MoE router of `model` that the kernel reproduces; returns how many."""
    if ops is None:
        return 0
    replaced = 0
    for parent, name, child in routers(model):
        weight = child.weight
        if (isinstance(child, (torch.nn.Linear, KernelRouter)) or list(child.children())
                or weight.dtype not in DTYPES or weight.device.type != "cpu" or getattr(child, "bias", None) is not None):
            continue
        rule = _kernel_rule(child, ops)
        if rule is not None:
            parent._modules[name] = kernel_router_class(type(child))(child, ops, *rule)
            replaced += 1
    return replaced
