"""Timing of one MoE layer's experts as the runtime computes them on the CPU, warm and cold, and of the
host memory copy that promotes an expert into a CPU plan's slot (torch is imported here).

The experts sit in a transformers experts module (`MixtralExperts`) whose fused tensors are the copies of
an `ExpertPool`, behind the runtime's own `ExpertStore`, and each path is called as the runtime calls it:
- `token`: one token through transformers' experts dispatch into the runtime's hook and its `MoeLayer`
  (a layer without slots whose misses run on the CPU), which computes all the token's experts in one
  fused `CpuExecutor.token` call: a CPU plan's decode, its bookkeeping included;
- `run`: `CpuExecutor.run` on a pass's CPU misses (prefill; decode with a GPU);
- `torch`: one expert through `module_expert_ffn` and `add_weighted`, as `MoeLayer._accumulate` computes
  an expert from its slot in a pass that goes through `MoeLayer._pass`.
Weights `cold`: every call takes the next experts of a pool larger than twice the last-level cache (a
model larger than the cache reads each expert from DRAM). Weights `warm`: every call takes the same
experts, which then stay in the last-level cache, as the weights of a model that fits it do.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from runtime.contracts.cache_policy import LayerCachePolicy, MissRule
from runtime.cpu_executor import CpuExecutor
from runtime.expert_math import add_weighted, module_expert_ffn
from runtime.expert_store import ExpertStore
from runtime.experts_hook import ATTRIBUTE, IMPLEMENTATION_NAME, register
from runtime.layer_context import LayerContext
from runtime.moe_layer import MoeLayer
from runtime.prefetch import Prefetcher

from .measure import ExpertPool, Timing, time_call


class MoeLayerBench:
    """An `ExpertPool`'s copies as the experts of one MoE layer, with the runtime's store, hook and executor."""

    def __init__(self, pool: ExpertPool) -> None:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        self.pool = pool
        register()  # the runtime's experts implementation, selected below as `load_model` selects it
        config = MixtralConfig(hidden_size=pool.hidden, intermediate_size=pool.intermediate,
                               num_local_experts=pool.copies, hidden_act="silu")
        config._experts_implementation = IMPLEMENTATION_NAME
        module = MixtralExperts(config)  # its own [copies, ...] tensors are never touched: replaced below
        module.gate_up_proj = torch.nn.Parameter(pool.w_in, requires_grad=False)  # [copies, 2I, H]
        module.down_proj = torch.nn.Parameter(pool.w_out, requires_grad=False)  # [copies, H, I]
        self.module = module
        self.store = ExpertStore(module, 0, torch.device("cpu"))
        self._layers: dict[int, MoeLayer] = {}  # threads -> the hook's layer with an executor of that many
        self._next = 0

    def experts(self, count: int, cache: str) -> list[int]:
        """The expert ids of the next call: the same ones every time (warm), or the next in the pool (cold)."""
        if cache == "warm":
            return list(range(count))
        ids = [(self._next + j) % self.pool.copies for j in range(count)]
        self._next = (self._next + count) % self.pool.copies
        return ids

    def fits_token(self, threads: int) -> bool:
        """Whether the runtime computes one token's experts in the fused call here (else `run`)."""
        return CpuExecutor(threads).fits_token(self.module, self.pool.dtype)

    def call(self, path: str, experts: int, tokens: int, threads: int, cache: str) -> Callable[[], object]:
        """One call of `path` on `experts` experts of `tokens` tokens each, with `threads` threads: what
        `time` times, and what the dense timings run before each repeat (the neighbour in a decode step)."""
        if path == "token" and tokens != 1:
            raise ValueError(f"the token path runs one token, got {tokens}")
        if path == "torch" and experts != 1:
            raise ValueError(f"the torch path runs one expert per call, got {experts}")
        if experts > self.pool.copies // 2:
            raise ValueError(f"{experts} experts per call need a pool of at least {2 * experts} copies, "
                             f"this one has {self.pool.copies}")
        executor = CpuExecutor(threads)  # the runtime's own CPU path, as the engine builds it
        gen = torch.Generator().manual_seed(1)
        x = (torch.randn(tokens, self.pool.hidden, generator=gen) * 0.1).to(self.pool.dtype)
        weights = torch.softmax(torch.randn(tokens, experts, generator=gen), dim=-1)  # [T, k] gate weights
        token_ids = torch.arange(tokens)
        ranks = [torch.full((tokens,), j, dtype=torch.long) for j in range(experts)]  # every token, every expert
        store, module = self.store, self.module
        if path == "token":
            self._layer(threads, experts)

            def token() -> object:
                ids = torch.tensor([self.experts(experts, cache)])  # [1, k]: the router's choice
                return module(x, ids, weights)  # transformers' dispatch -> the runtime's hook -> MoeLayer
            return token
        if path == "run":
            def run() -> object:
                ids = self.experts(experts, cache)
                return executor.run(module, store, x, weights, [(token_ids, ranks[j], e) for j, e in enumerate(ids)])
            return run

        def torch_path() -> object:
            (e,) = self.experts(1, cache)
            out = torch.zeros(x.shape, dtype=torch.float32)
            y = module_expert_ffn(module, x[token_ids], *store.weights_args(store.host_weights(e)))
            add_weighted(out, token_ids, ranks[0], y, weights)
            return out
        return torch_path

    def time(self, path: str, experts: int, tokens: int, threads: int, cache: str, *, warmup: int, repeats: int,
             min_seconds: float = 0.0) -> Timing:
        """Wall time of one call of `path` (see `call`)."""
        torch.set_num_threads(threads)
        call = self.call(path, experts, tokens, threads, cache)
        with torch.inference_mode():
            return time_call(call, warmup=warmup, repeats=repeats, min_seconds=min_seconds)

    def time_copy(self, threads: int, *, warmup: int, repeats: int, min_seconds: float = 0.0) -> Timing:
        """Wall time of copying one expert into another's place in host memory, both cold, as
        `ExpertStore.copy_to_slot` promotes an expert into a CPU plan's slot (one copy per fused tensor)."""
        torch.set_num_threads(threads)
        half = self.pool.copies // 2
        host = self.store.host

        def copy() -> None:
            (src,) = self.experts(1, "cold")
            dst = (src + half) % self.pool.copies
            for t in host:
                t[dst].copy_(t[src], non_blocking=True)

        with torch.inference_mode():
            return time_call(copy, warmup=warmup, repeats=repeats, min_seconds=min_seconds)

    def _layer(self, threads: int, top_k: int) -> MoeLayer:
        """The runtime's layer for this module: no slots, misses on the CPU (an `accelerator: cpu` plan
        without a cache), attached to the module where the hook looks for it."""
        layer = self._layers.get(threads)
        if layer is None:  # as the engine builds it: no routing replay, no trace, no prefetch
            context = LayerContext(CpuExecutor(threads), Prefetcher(None, 1, top_k))
            layer = self._layers[threads] = MoeLayer(0, self.module, None, self.store, LayerCachePolicy(0, "lru"),
                                                     MissRule("cpu", 0, False), context)
        setattr(self.module, ATTRIBUTE, layer)
        return layer
