"""The engine: builds each MoE layer's cache from the plan, attaches it to the model, and sums the books.

What spans layers (the pass counter, the routing replayed and recorded, the background copies and
prefetch, the CPU executor, the device seam of a CUDA plan) is one `LayerContext` the layers share; the
engine starts passes and traces on it and hands the layers nothing else.

On a CUDA plan the engine page-locks the experts' host memory in place through the seam
(`cudaHostRegister`: no second, rounded-up pinned copy) and reports the bytes locked.
"""
from __future__ import annotations

from typing import Any

import torch

from .contracts.cache_policy import LayerCachePolicy
from .contracts.traces import TraceRecorder
from .cpu_executor import CpuExecutor
from .cpu_decode import use_cpu_decode_path
from .device import CudaDevice, DeviceSeam
from .experts_hook import ATTRIBUTE
from .huge_pages import bytes_in_huge_pages, move_to_huge_pages
from .expert_store import ExpertStore
from .layer_context import LayerContext
from .loader import DTYPES, LoadedModel
from .moe_layer import MoeLayer
from .native_decode import NativeDecode, build as build_native_decode
from .quant_experts import DequantScratch, quantized_of
from .plan import Plan
from .prefetch import Prefetcher
from .replay import RoutingReplay
from .transfer_buffers import TransferBuffers


class Engine:
    def __init__(self, loaded: LoadedModel, plan: Plan, replay: RoutingReplay | None = None,
                 huge_pages: bool | None = None, seam: DeviceSeam | None = None) -> None:
        """`seam`: the accelerator's calls (runtime/device.py); by default a `CudaDevice` for a CUDA device
        and none for the CPU. Tests pass a `RecordingDevice` to run a CUDA plan's schedule on the CPU."""
        experts = loaded.experts
        num_layers, num_experts = len(experts), experts[0].num_experts
        slots = plan.cache.slots_per_layer(num_layers, num_experts)
        preload = plan.cache.preload_per_layer(num_layers, num_experts)
        rule = plan.miss.rule
        self.device = loaded.device
        self.num_experts = num_experts
        self.top_k = int(getattr(loaded.model.config, "num_experts_per_tok", 0) or 0)
        torch.set_num_threads(plan.hardware.cpu_threads)
        cpu = CpuExecutor(plan.hardware.cpu_threads)
        if seam is None and self.device.type == "cuda":
            seam = CudaDevice(self.device)
        self.seam = seam
        if seam is None:  # the dense part runs on the CPU too: C kernels at decode
            use_cpu_decode_path(loaded.model, experts, cpu.kernel, plan.hardware.cpu_threads)
        # before the expert stores take their views of the weights: a move re-points the parameters.
        # None: move the rest only where torch's allocator gave the large weights 2 MB pages (it is small)
        # The weights: the parameters and, for int experts, their codes and scales (not parameters)
        weights = list(loaded.model.parameters()) + [t for m in experts if (q := quantized_of(m)) for t in q.tensors()]
        if huge_pages is not False:
            move_to_huge_pages(weights, only_if_born=huge_pages is None)
        self.huge_page_bytes = bytes_in_huge_pages(weights)
        self.context = LayerContext(cpu, Prefetcher(seam, num_layers, self.top_k), replay, seam=seam)
        self.layers: list[MoeLayer] = []
        self.locked_host_bytes = 0  # expert host memory page-locked for the accelerator's copies
        scratch = DequantScratch()  # one for every layer: quantized experts dequantize into it
        transfer = TransferBuffers(self.device)  # one pair for every layer: transfers that take no slot
        for i, module in enumerate(experts):
            store = ExpertStore(module, slots[i], self.device, scratch, DTYPES[plan.model.dtype], transfer)
            if seam is not None:  # before the first copy from it: in place, no copy, no rounding up
                self.locked_host_bytes += seam.lock_host(store.host)
            policy = LayerCachePolicy(slots[i], plan.cache.policy, preload[i])
            for expert, slot in policy.resident().items():  # preload: before the first token
                store.copy_to_slot(expert, slot)
            layer = MoeLayer(i, module, loaded.routers[i], store, policy, rule, self.context)
            setattr(module, ATTRIBUTE, layer)
            self.layers.append(layer)
        for layer, nxt in zip(self.layers, self.layers[1:]):
            layer.next_layer = nxt
            # prefetch into each next layer that has a router to guess with and takes guesses
            if plan.prefetch.lookahead and nxt.router is not None and nxt.policy.admits:
                layer.prefetch_into = nxt
        # decode tokens of a recognised model without transformers' per-operation Python (CPU plans only;
        # built last: it takes the MoE layers attached above and the weights where the move left them)
        self.native: NativeDecode | None = build_native_decode(loaded.model) if seam is None else None
        if seam is not None:
            seam.synchronize()  # the preloaded slots are in place before the first token

    # ---- passes and traces ------------------------------------------------------------------
    def begin_pass(self, phase: str, tokens: int) -> None:
        self.context.begin_pass(phase, tokens)

    def record_trace(self, on: bool) -> TraceRecorder | None:
        """From the next pass on, record the routing into a new recorder (returned), or record nothing."""
        self.context.recorder = TraceRecorder(len(self.layers)) if on else None
        return self.context.recorder

    # ---- statistics -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        per_layer = [layer.stats.as_dict() for layer in self.layers]
        hits = sum(s["hits"] for s in per_layer)
        misses = sum(s["misses"] for s in per_layer)
        guesses = sum(s["prefetch_copies"] for s in per_layer)
        return {
            "cache": {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
                      "per_layer": [{"hits": s["hits"], "misses": s["misses"], "hit_rate": s["hit_rate"]}
                                    for s in per_layer]},
            "cpu_misses": sum(s["cpu_misses"] for s in per_layer),
            "accelerator_misses": sum(s["accelerator_misses"] for s in per_layer),
            "promotions": sum(s["promotions"] for s in per_layer),
            "prefetch": {"copies": guesses, "right": sum(s["prefetch_right"] for s in per_layer)},
            "bytes_to_accelerator": sum(s["bytes_to_accelerator"] for s in per_layer),
            "cpu_expert_seconds": sum(s["cpu_expert_seconds"] for s in per_layer),
            "weights_in_huge_pages_bytes": self.huge_page_bytes,
            "locked_host_bytes": self.locked_host_bytes,
        }
