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

Integer experts (int8, int4: `MoeLayerBench.quantized`): the module's experts are replaced by quantized
copies (runtime/quant_experts.py, as quantize-at-load leaves them), so the same three paths run the
runtime's int kernels (runtime/kernels/qgemv.c) through `CpuExecutor`'s quantized calls, with the
activations in the model dtype of the pool.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from runtime.contracts.cache_policy import LayerCachePolicy, MissRule
from runtime.contracts.expert_format import DEFAULT_GROUP_SIZE, expert_bytes as format_expert_bytes
from runtime.cpu_executor import CpuExecutor
from runtime.expert_math import add_weighted, module_expert_ffn
from runtime.expert_store import ExpertStore
from runtime.experts_hook import ATTRIBUTE, IMPLEMENTATION_NAME, register
from runtime.layer_context import LayerContext
from runtime.moe_layer import MoeLayer
from runtime.prefetch import Prefetcher
from runtime.quant_experts import QuantizedExperts, attach
from runtime.quant_format import quantize

from .measure import ExpertPool, StreamBuffer, Timing, cold_bytes, time_call

# LLCs' worth of unrelated reads after a cold neighbour's experts (MoeLayerBench.neighbour)
COLD_NEIGHBOUR_LLCS = 2


class MoeLayerBench:
    """An `ExpertPool`'s copies as the experts of one MoE layer, with the runtime's store, hook and executor."""

    def __init__(self, pool: ExpertPool, quantized: QuantizedExperts | None = None) -> None:
        """The pool's copies as the layer's experts; or, with `quantized` (int8/int4 copies of the pool's
        expert, `MoeLayerBench.quantized`), those in their place, computing in the pool's dtype."""
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        self.pool = pool
        self.copies = pool.copies if quantized is None else quantized.num_experts
        register()  # the runtime's experts implementation, selected below as `load_model` selects it
        config = MixtralConfig(hidden_size=pool.hidden, intermediate_size=pool.intermediate,
                               num_local_experts=self.copies, hidden_act="silu")
        config._experts_implementation = IMPLEMENTATION_NAME
        module = MixtralExperts(config)  # its own [copies, ...] tensors are never touched: replaced below
        module.gate_up_proj = torch.nn.Parameter(pool.w_in, requires_grad=False)  # [copies, 2I, H]
        module.down_proj = torch.nn.Parameter(pool.w_out, requires_grad=False)  # [copies, H, I]
        if quantized is not None:
            attach(module, quantized)  # as quantize-at-load leaves a module: the float weights dropped
        self.module = module
        self.format = str(pool.dtype).removeprefix("torch.") if quantized is None else quantized.fmt
        self.store = ExpertStore(module, 0, torch.device("cpu"), dtype=pool.dtype)
        self.expert_bytes = self.store.expert_bytes  # what one expert's call reads, in its stored format
        self._layers: dict[int, MoeLayer] = {}  # threads -> the hook's layer with an executor of that many
        self._next = 0

    @classmethod
    def quantized(cls, hidden: int, intermediate: int, fmt: str, dtype: str, *, pool_bytes: int | None = None,
                  min_copies: int = 2, group_size: int = DEFAULT_GROUP_SIZE) -> "MoeLayerBench":
        """A layer of int8/int4 experts (`fmt`, groups of `group_size` inputs) computing in `dtype`: one random
        expert quantized once (runtime/quant_format.py), in as many copies as make `pool_bytes` of quantized
        weights (default: twice the last-level cache, at least 256 MiB), so that a cold call reads DRAM."""
        one = format_expert_bytes(fmt, hidden, intermediate, group_size=group_size)
        copies = max(min_copies, math.ceil((cold_bytes() if pool_bytes is None else pool_bytes) / one))
        pool = ExpertPool(hidden, intermediate, dtype, pool_bytes=0, min_copies=1)  # the float expert, once
        qweight, scales = {}, {}
        for name, w in zip(("gate_up_proj", "down_proj"), (pool.w_in[0], pool.w_out[0])):
            q, s = quantize(w, fmt, group_size)
            qweight[name] = q.unsqueeze(0).repeat(copies, *([1] * q.dim()))
            scales[name] = s.unsqueeze(0).repeat(copies, *([1] * s.dim()))
        names = ("gate_up_proj", "down_proj")
        return cls(pool, QuantizedExperts(fmt, group_size, names, qweight, scales))

    def experts(self, count: int, cache: str) -> list[int]:
        """The expert ids of the next call: the same ones every time (warm), or the next in the pool (cold)."""
        if cache == "warm":
            return list(range(count))
        ids = [(self._next + j) % self.copies for j in range(count)]
        self._next = (self._next + count) % self.copies
        return ids

    def fits_token(self, threads: int) -> bool:
        """Whether the runtime computes one token's experts in the fused call here (else `run`)."""
        cpu, quantized = CpuExecutor(threads), self.store.quantized
        return (cpu.fits_token(self.module, self.pool.dtype) if quantized is None
                else cpu.fits_token_quantized(self.module, quantized, self.pool.dtype))

    def neighbour(self, experts: int, threads: int, cache: str, llc: int | None,
                  stream: Callable[[], StreamBuffer], llcs: int = COLD_NEIGHBOUR_LLCS) -> Callable[[], object]:
        """What a decode step runs between two calls of a layer's dense part (or of the step outside the
        layers), untimed before each repeat of theirs: `experts` experts for one token along the runtime's
        path, warm or cold; cold, then `llcs` last-level caches' worth of unrelated reads from `stream()`
        (the other layers' share of a token whose bytes do not fit the cache).

        The reads come on top of the experts' call, however large it is: the timed layer reads its own
        weights again at every repeat, and an LLC that keeps data by its reuse (AMD Zen 4's) holds part of
        them through a stream of single-use experts. On AMD Zen 4 (one thread), the one-layer loop of the
        benchmark model timed 0.89 of a layer in the real decode after the experts' call alone, 0.93 with
        one LLC of reads added and 1.00 with two (bench/diagnostics/cold_loop_check.py, docs/benchmarks.md)."""
        call = self.call("token" if self.fits_token(threads) else "run", experts, 1, threads, cache)
        rest = llcs * (llc or 0) if cache == "cold" else 0
        if rest <= 0:
            return call
        buffer = stream()
        return lambda: (call(), buffer.evict(rest))

    def call(self, path: str, experts: int, tokens: int, threads: int, cache: str) -> Callable[[], object]:
        """One call of `path` on `experts` experts of `tokens` tokens each, with `threads` threads: what
        `time` times, and what the dense timings run before each repeat (the neighbour in a decode step)."""
        if path == "token" and tokens != 1:
            raise ValueError(f"the token path runs one token, got {tokens}")
        if path == "torch" and experts != 1:
            raise ValueError(f"the torch path runs one expert per call, got {experts}")
        if experts > self.copies // 2:
            raise ValueError(f"{experts} experts per call need a pool of at least {2 * experts} copies, "
                             f"this one has {self.copies}")
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
        half = self.copies // 2
        host = self.store.host

        def copy() -> None:
            (src,) = self.experts(1, "cold")
            dst = (src + half) % self.copies
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
