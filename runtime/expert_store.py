"""Where one MoE layer's expert weights live: all of them in host memory, some in accelerator slots.

Host storage is the experts module's own fused tensors (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`,
biases if any): expert e is the contiguous slice [e], so bringing it to a slot is one copy per tensor.
Slot storage is a tensor of the same layout with `slots` rows on the accelerator, allocated once.

Quantized experts (runtime/quant_experts.py): the host tensors are each projection's `qweight` and
`scales` ([E, ...] each, expert e the slice [e]), so a slot holds the quantized expert and a promotion or
prefetch copies the quantized bytes, one copy per tensor. `weights_args` dequantizes an expert's matrices
into the shared `DequantScratch` in the model dtype before the expert math reads them.
"""
from __future__ import annotations

import torch

from .expert_math import in_proj_name
from .quant_experts import DequantScratch, quantized_of
from .transfer_buffers import TransferBuffers


class ExpertStore:
    def __init__(self, module: torch.nn.Module, slots: int, device: torch.device,
                 scratch: DequantScratch | None = None, dtype: torch.dtype | None = None,
                 transfer: TransferBuffers | None = None) -> None:
        """`scratch` and `dtype` (the model's): where quantized experts dequantize to, and in what;
        `transfer`: the two buffers transfers that take no slot are copied into (the engine's one pair)."""
        self.module = module
        self.device = device
        self.quantized = quantized_of(module)
        bias = [f"{in_proj_name(module)}_bias", "down_proj_bias"] if getattr(module, "has_bias", False) else []
        if self.quantized is None:
            names = [in_proj_name(module), "down_proj"] + bias
            self.host = [getattr(module, n) for n in names]  # [E, ...] each, in host memory
        else:
            q = self.quantized
            names = [f"{p}.{part}" for p in q.projections for part in ("qweight", "scales")] + bias
            self.host = q.tensors() + [getattr(module, n) for n in bias]
        self.names = names
        self.scratch = scratch if scratch is not None else DequantScratch()
        # the dtype quantized experts dequantize into (the model's; float experts are used as they are)
        self.dtype = dtype if dtype is not None else self.host[0].dtype if self.quantized is None else torch.float32
        # float experts honour the module's layout flag; quantized ones are kept in the standard layout
        self.transposed = getattr(module, "is_transposed", False) and self.quantized is None
        # Zeroed, not just allocated: in host memory (plans with `accelerator: cpu`) an untouched buffer
        # page-faults on its first copy, which measured 55-87 ms against 2.3-2.5 ms for a 22 MB expert
        # (bench/predict_vs_measure.py, AVX2 VM): the first promotions would cost what no profile row says.
        self.slots = [torch.zeros((slots, *t.shape[1:]), dtype=t.dtype, device=device) for t in self.host]
        self.expert_bytes = sum(t[0].numel() * t.element_size() for t in self.host)
        # where accelerator misses that do not enter the cache are copied (two buffers, shared by the layers)
        self.transfer = transfer if transfer is not None else TransferBuffers(device)
        # each expert's and each slot's views, made once: a decode token asks for them in every layer
        self._host_views = [[t[e] for t in self.host] for e in range(self.host[0].shape[0])]
        self._slot_views = [[t[s] for t in self.slots] for s in range(slots)]

    def host_weights(self, expert: int) -> list[torch.Tensor]:
        return self._host_views[expert]

    def slot_weights(self, slot: int) -> list[torch.Tensor]:
        return self._slot_views[slot]

    def copy_to_slot(self, expert: int, slot: int) -> int:
        """Copy an expert into a slot (asynchronous on CUDA from pinned memory); returns the bytes copied."""
        for dst, src in zip(self.slots, self.host):
            dst[slot].copy_(src[expert], non_blocking=True)
        return self.expert_bytes

    def slot_copies(self, expert: int, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(destination, source) of each tensor that bringing `expert` into `slot` copies (the device seam's
        copies on a CUDA plan)."""
        return list(zip(self._slot_views[slot], self._host_views[expert]))

    def scratch_copies(self, expert: int, buffer: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(destination, source) pairs that put an expert's weights in transfer buffer `buffer`, on the
        accelerator outside the cache (static policy, zero slots). Counted by the memory accounting
        (`transfer_scratch`, both buffers) before they are allocated, on first use."""
        src = self._host_views[expert]
        return list(zip(self.transfer.tensors(buffer, src), src))

    def copy_to_scratch(self, expert: int) -> list[torch.Tensor]:
        """An expert's weights on the accelerator outside the cache, in buffer 0: the path of a plan whose
        accelerator is the CPU, where copy and compute run one after the other."""
        pairs = self.scratch_copies(expert)
        for dst, src in pairs:
            dst.copy_(src, non_blocking=True)
        return [dst for dst, _ in pairs]

    def weights_args(self, weights: list[torch.Tensor]) -> tuple:
        """(w_in, w_out, b_in, b_out) for `module_expert_ffn`; a quantized expert's matrices are dequantized
        into the scratch (valid until the next call on the same device)."""
        q = self.quantized
        if q is not None:
            w_in = self.scratch.dequantize(0, weights[0], weights[1], q.fmt, self.dtype)
            w_out = self.scratch.dequantize(1, weights[2], weights[3], q.fmt, self.dtype)
            biases = weights[4:6] if len(weights) == 6 else (None, None)
            return w_in, w_out, biases[0], biases[1]
        if len(weights) == 4:
            return weights[0], weights[1], weights[2], weights[3]
        return weights[0], weights[1], None, None
