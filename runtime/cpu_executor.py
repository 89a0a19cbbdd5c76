"""Compute missed experts on CPU threads, from the experts' host memory.

The activations come over from the accelerator once per layer (a few KB per token); the expert weights
never move: for a decode token, streaming an expert from DRAM beats copying it over PCIe.

Three paths:
- one token whose experts all run on the CPU (decode with `accelerator: cpu`, `token`): one fused
  kernel call computes both projections, the SiLU gate and the weighted sum of all the token's experts,
  in one parallel region, when the module's gate is the standard SiLU(gate) * up (checked on a probe);
- token counts where the GEMV kernel of runtime/kernels beats torch (its measured rule, by instruction
  set), `run`: the input projections of all of the layer's missed experts in one parallel region, then
  all their output projections in another, so the experts run in parallel across the threads and each
  weight byte is read once (an expert with more tokens than one kernel call holds runs in even pieces in
  the same call: GemvKernel.multi);
- otherwise, or a layout the kernel does not cover (biases, transposed weights, a dtype or CPU it does
  not support): torch's matmul (oneDNN, AMX where the CPU has it), expert by expert.

Quantized experts (int8/int4, runtime/quant_experts.py) take `_run_quantized`: the input projections of
all the layer's missed experts, the gate, then all their output projections, each projection set through
ONE seam, `quantized_multi`: the int kernels of runtime/kernels/qgemv.c where they run (AVX2 + FMA + F16C,
a bf16 or fp32 model, in pieces of at most their token limit; they multiply exactly the reference's
dequantized weights),
else each matrix dequantized into the shared scratch in the model dtype and multiplied with torch, the
arithmetic a hit on the accelerator does. One decode token whose experts all run on the CPU takes the
int kernels' fused path (`token_quantized`) where `fits_token_quantized` says so: the int kernels run, no biases, no
post-expert norm, the standard SiLU gate.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .expert_math import add_weighted, ffn, module_expert_ffn, module_gate, silu_gate
from .expert_store import ExpertStore
from .kernels import GemvKernel, load
from .quant_experts import DequantScratch, QuantizedExperts

Job = tuple[torch.Tensor, torch.Tensor, int]  # (token indices, rank positions, expert id)


class CpuExecutor:
    def __init__(self, threads: int, kernel: GemvKernel | None = None, use_kernel: bool = True) -> None:
        self.threads = threads
        self.kernel = (kernel or load()) if use_kernel else None
        # (id(module), dtype) -> whether `token` runs it: asked in every layer of every decode token
        self._fits_token: dict[tuple[int, torch.dtype], bool] = {}

    def run(self, module: torch.nn.Module, store: ExpertStore, x: torch.Tensor, top_k_weights: torch.Tensor,
            jobs: list[Job]) -> torch.Tensor:
        """The weighted sum of the given experts' outputs, [T, H] float32 on the CPU."""
        x_cpu = x.to("cpu")
        w_cpu = top_k_weights.to("cpu")
        out = torch.zeros(x_cpu.shape, dtype=torch.float32)
        if store.quantized is not None:
            self._run_quantized(module, store, x_cpu, w_cpu, jobs, out)
            return out
        small = [j for j in jobs if self._kernel_fits(module, x_cpu.dtype, len(j[0]))]
        if small:
            self._run_kernel(module, store, x_cpu, w_cpu, small, out)
        done = {j[2] for j in small}
        for tokens, ranks, expert in jobs:
            if expert in done:
                continue
            y = module_expert_ffn(module, x_cpu[tokens], *store.weights_args(store.host_weights(expert)))
            add_weighted(out, tokens, ranks, y, w_cpu)
        return out

    # ---- quantized experts ---------------------------------------------------------------------
    def quantized_multi(self, qweights: list[torch.Tensor], scales: list[torch.Tensor], inputs: list[torch.Tensor],
                        fmt: str, group_size: int, out_dtype: torch.dtype,
                        scratch: DequantScratch) -> list[torch.Tensor]:
        """THE SEAM for the int8/int4 CPU kernels: [x_i @ W_i^T for each i], W_i the dequantized matrix i.

        Receives, for each matrix i of one projection of the missed experts of one layer (the input
        projections of all of them in one call, then their output projections in another):
        - `qweights[i]`: the expert's slice of the layer's `qweight`, a contiguous view into host memory:
          int8 [N, K] (fmt "int8") or uint8 [N, K/2] (fmt "int4": byte j of a row holds input 2j in its low
          nibble and input 2j+1 in its high nibble, each as q + 8);
        - `scales[i]`: float16 [N, K/G], contiguous; w[n, k] = float(scales[n, k // G]) * q[n, k];
        - `inputs[i]`: x_i [T_i, K] contiguous, in `out_dtype` (the model dtype: bfloat16, float16 or float32);
        - `group_size` G (K % G == 0, G a multiple of 8), `fmt` "int8" or "int4";
        - `scratch`: the shared dequantization buffer (the torch path below uses it; a kernel need not).
        Returns [y_i [T_i, N] in `out_dtype`]: the products accumulated in fp32 and rounded once to
        `out_dtype`, as torch's matmul of x_i by the dequantized matrix (`out_dtype`(float(scale) * q))
        rounds its output: the conformance tests compare tokens with that reference.
        The int kernels take the matrices whose token counts they run (GemvKernel.handles_int), all in
        one call; the rest are dequantized into the scratch (model dtype) and multiplied with torch, matrix
        by matrix.
        """
        out: list[torch.Tensor | None] = [None] * len(inputs)
        k = self.kernel
        if k is not None:
            fast = [i for i, x in enumerate(inputs) if k.handles_int(fmt, out_dtype, x.shape[0], self.threads)]
            if fast:
                ys = k.qmulti([(qweights[i], scales[i]) for i in fast], [inputs[i] for i in fast], self.threads,
                              out_dtype)
                for i, y in zip(fast, ys):
                    out[i] = y
        for i, (qw, sc, x) in enumerate(zip(qweights, scales, inputs)):
            if out[i] is None:
                out[i] = F.linear(x, scratch.dequantize(0, qw, sc, fmt, out_dtype))
        return out  # type: ignore[return-value]

    def fits_token_quantized(self, module: torch.nn.Module, quantized: QuantizedExperts,
                             dtype: torch.dtype) -> bool:
        """Whether `token` runs this module's quantized experts for a one-token x of `dtype` (then `token`
        receives, per chosen expert, [in qweight, in scales, out qweight, out scales] views of one expert):
        the int kernels run this format and dtype at one token, the module has no biases and no post-expert
        norm, and its gate is SiLU(gate) * up over the input projection's [gate; up] rows (checked once on a
        probe). The stored matrices are in the standard layout whatever the module's `is_transposed` says."""
        key = (id(module), dtype)
        known = self._fits_token.get(key)
        if known is None:
            k = self.kernel
            width = quantized.qweight[quantized.projections[0]].shape[1]
            known = self._fits_token[key] = (
                k is not None and k.handles_int(quantized.fmt, dtype, 1, self.threads)
                and quantized.projections[0] == "gate_up_proj"
                and not getattr(module, "has_bias", False) and not getattr(module, "has_post_expert_norm", False)
                and _is_silu_gated(module, width))
        return known

    def _run_quantized(self, module: torch.nn.Module, store: ExpertStore, x: torch.Tensor, w: torch.Tensor,
                       jobs: list[Job], out: torch.Tensor) -> None:
        """The missed quantized experts of one layer: input projections, gate, output projections, each set
        through `quantized_multi`; the same arithmetic as `module_expert_ffn` on the dequantized weights."""
        q = store.quantized
        gate = module_gate(module)
        experts = [e for _, _, e in jobs]
        bias = len(store.host) == 6  # qweight, scales of each projection, then the two biases
        h = self.quantized_multi([store.host[0][e] for e in experts], [store.host[1][e] for e in experts],
                                 [x[tokens].contiguous() for tokens, _, _ in jobs], q.fmt, q.group_size, x.dtype,
                                 store.scratch)
        if bias:
            h = [hi + store.host[4][e] for hi, e in zip(h, experts)]
        hidden = [gate(hi).contiguous() for hi in h]
        ys = self.quantized_multi([store.host[2][e] for e in experts], [store.host[3][e] for e in experts], hidden,
                                  q.fmt, q.group_size, x.dtype, store.scratch)
        post_norm = getattr(module, "has_post_expert_norm", False)
        for (tokens, ranks, e), y in zip(jobs, ys):
            if bias:
                y = y + store.host[5][e]
            if post_norm:
                y = module.post_expert_norm(y)
            add_weighted(out, tokens, ranks, y, w)

    def fits_token(self, module: torch.nn.Module, dtype: torch.dtype) -> bool:
        """Whether `token` can run this module's experts: the kernel wins at one token, and the module
        has the standard layout with a SiLU gate over [gate; up] (checked once on a probe)."""
        key = (id(module), dtype)  # the executor's thread count is fixed at construction
        known = self._fits_token.get(key)
        if known is None:
            known = self._fits_token[key] = self._kernel_fits(module, dtype, 1) and _is_silu_gated(module)
        return known

    def token(self, x: torch.Tensor, chosen: list[tuple[list[torch.Tensor], float]]) -> torch.Tensor:
        """One token x [1, H] through the chosen experts ((w_in, w_out), gate weight), summed: x's shape and
        dtype."""
        if not chosen:
            return torch.zeros_like(x)
        return self.kernel.moe_token([w[0] for w, _ in chosen], [w[1] for w, _ in chosen],
                                     x if x.is_contiguous() else x.contiguous(), [g for _, g in chosen], self.threads)

    def token_quantized(self, x: torch.Tensor, chosen: list[tuple[list[torch.Tensor], float]]) -> torch.Tensor:
        """`token` for quantized experts: each chosen expert's [in qweight, in scales, out qweight, out scales]
        views with its gate weight (where `fits_token_quantized` holds). A layer picks this or `token` once,
        when it is built: the per-token path asks nothing about the weights' dtype."""
        if not chosen:
            return torch.zeros_like(x)
        return self.kernel.qmoe_token([(w[0], w[1]) for w, _ in chosen], [(w[2], w[3]) for w, _ in chosen],
                                      x if x.is_contiguous() else x.contiguous(), [g for _, g in chosen],
                                      self.threads)

    def expert(self, x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
               gate: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One expert in the standard layout (w_in [2I, H], w_out [H, I], no bias) on x [T, H], by the path
        `run` would take for it: what the profiler times."""
        k = self.kernel
        if k is None or not k.handles(x.dtype, x.shape[0], self.threads):
            return ffn(x, w_in, w_out, gate)
        h = gate(k.multi([w_in], [x.contiguous()], self.threads, x.dtype)[0]).contiguous()
        return k.multi([w_out], [h], self.threads, x.dtype)[0]

    def _kernel_fits(self, module: torch.nn.Module, dtype: torch.dtype, tokens: int) -> bool:
        k = self.kernel
        return (k is not None and k.handles(dtype, tokens, self.threads)
                and not getattr(module, "has_bias", False) and not getattr(module, "is_transposed", False)
                and not getattr(module, "has_post_expert_norm", False))

    def _run_kernel(self, module: torch.nn.Module, store: ExpertStore, x: torch.Tensor, w: torch.Tensor,
                    jobs: list[Job], out: torch.Tensor) -> None:
        gate = module_gate(module)
        inputs = [x[tokens].contiguous() for tokens, _, _ in jobs]
        w_in = [store.host[0][e] for _, _, e in jobs]
        # Outputs rounded to the weights' dtype, as the reference's matmuls round theirs.
        hidden = [gate(h).contiguous() for h in self.kernel.multi(w_in, inputs, self.threads, x.dtype)]
        w_out = [store.host[1][e] for _, _, e in jobs]
        for (tokens, ranks, _), y in zip(jobs, self.kernel.multi(w_out, hidden, self.threads, x.dtype)):
            add_weighted(out, tokens, ranks, y, w)


def _is_silu_gated(module: torch.nn.Module, width: int | None = None) -> bool:
    """Whether the module's activation between the projections is SiLU(first half) * second half, the gate
    the fused kernel computes: the module's own gate is run on a probe and compared exactly. `width`: the
    input projection's output count (2I), read from `gate_up_proj` when not given (quantized modules have
    none)."""
    if not getattr(module, "has_gate", True):
        return False
    if width is None:
        width = getattr(module, "gate_up_proj").shape[1]
    probe = torch.linspace(-6, 6, width, dtype=torch.float32).roll(width // 3).reshape(1, width)
    with torch.no_grad():
        try:
            theirs = module_gate(module)(probe)
        except Exception:  # a gate that does not take this shape is not the standard one
            return False
    return theirs.shape == (1, width // 2) and torch.equal(theirs, silu_gate(probe))

