"""What a plan needs in memory, device by device and item by item: one accounting for both sides.

The runtime's memory guard checks it against the memory this host has free before any weight is read;
the planner's cost model and tuner check it against the profile's memory. Both call `memory_items`, so
`tune` never promises a plan that `run` refuses for want of memory. Pure Python (no torch).

Items (bytes):
- `dense_weights`: everything but the routed experts (embeddings, attention, norms, routers, shared
  experts, dense MLPs, lm_head);
- `kv_cache`: keys and values of `kv_tokens` tokens in every attention layer;
- `expert_slots`: the plan's cache slots, each one routed expert;
- `workspace`: the largest activations of one forward pass of `pass_tokens` tokens held at once, in
  the activation dtype: hidden states and residual (2 x T x H), q/k/v/o (4 x T x H), the gate/up
  output of one expert call (2 x T x I of the widest MLP), float32 logits of the last token (V x 4);
- `transfer_scratch`: `TRANSFER_BUFFERS` experts (two), where a miss computed on the accelerator outside the
  cache is copied, the next one's copy running while this one is computed (runtime/transfer_buffers.py
  allocates them on the first such miss, one pair for all layers: counted before, as everything else is);
  none for a plan that computes no miss on the accelerator (`miss.compute: cpu`, `transfer_min_tokens: 0`),
  which never allocates them;
- `dequant_scratch` (int8/int4 experts only): one expert in the activation dtype, which a quantized
  expert is dequantized into before its matmuls (on the accelerator for hits and accelerator misses; on
  the host as well on an accelerator plan, for CPU misses computed through torch);
- `cpu_expert_pass` (host, where the plan computes misses on CPU threads): what one layer's CPU experts
  hold at once for a pass, all its experts computed in one call (runtime/cpu_executor.py): each expert's
  gathered inputs (H), its [gate; up] outputs (2I) and their gated product (I), and the outputs (H), in the
  activation dtype, plus the kernels' float32 copy of the widest input row (max(H, I), runtime/kernels'
  shared scratch, which keeps its largest size), per (token, chosen expert) pair the CPU computes; the
  pairs are the pass's tokens times top-k, or fewer where larger misses go to the accelerator
  (`cpu_expert_pairs`). For a 2,048-token Mixtral prompt that is 0.65 GB against the `workspace`'s
  0.2 GB;
- `reserve` (accelerator only): room for the CUDA context's own allocations, the math libraries'
  workspaces, the caching allocator's rounding and the activations this accounting does not itemise.
- `experts`: every routed expert, which lives in host memory whatever the plan;
- `dense_weights_while_loading`: on an accelerator plan, the dense weights pass through host memory
  while they are loaded.
With `accelerator: cpu` every item is host memory (a slot is then a second copy of an expert).
"""
from __future__ import annotations

from .cache_policy import MissRule
from .expert_format import is_quantized
from .model_shape import ModelShape
from .schedule import TRANSFER_BUFFERS

HOST = "host"
ACCELERATOR = "accelerator"
# The accelerator memory kept free beyond everything counted: at least 0.8 GiB (DESIGN, "Accelerator
# memory"). A CUDA context alone takes 0.3-0.5 GiB on current drivers, cuBLAS a workspace per stream.
ACCELERATOR_RESERVE = int(0.8 * 2**30)
# The host memory an accelerator plan must leave unlocked: page-locked expert memory (cudaHostRegister) can
# be neither swapped nor reclaimed, and the rest of the host still needs room for the kernel, the Python
# process (torch and transformers alone are 0.25 GiB resident on the CPU build; CUDA's libraries and its
# context's host allocations add 1-2 GiB) and the dense weights while they are read. A policy margin, not a
# measurement: a plan that leaves less is refused before anything is read, with the numbers.
HOST_LOCK_MARGIN = 4 * 2**30


def locked_host_bytes(shape: ModelShape, on_accelerator: bool) -> int:
    """The host bytes an accelerator plan page-locks in place: every routed expert, in its stored format
    (0 with `accelerator: cpu`, which locks nothing)."""
    return shape.expert_bytes_total if on_accelerator else 0


def workspace_bytes(shape: ModelShape, pass_tokens: int) -> int:
    """The activations of one forward pass of `pass_tokens` tokens held at once."""
    tokens = max(pass_tokens, 1)
    widest = max(shape.expert_intermediate, shape.shared_expert_intermediate, shape.dense_intermediate)
    return int(tokens * (6 * shape.hidden + 2 * widest) * shape.dtype_bytes + shape.vocab * 4)


def cpu_expert_pairs(shape: ModelShape, pass_tokens: int, rule: MissRule) -> int:
    """The most (token, chosen expert) pairs one layer computes on CPU threads in a pass of `pass_tokens`:
    none where every miss goes to the accelerator; where misses of `transfer_min_tokens` tokens or more do,
    each CPU expert has fewer."""
    if rule.compute == "accelerator":
        return 0
    pairs = max(pass_tokens, 1) * shape.top_k
    if rule.transfer_min_tokens > 0:
        pairs = min(pairs, shape.num_experts * (rule.transfer_min_tokens - 1))
    return pairs


def cpu_expert_pass_bytes(shape: ModelShape, pairs: int) -> int:
    """`cpu_expert_pass` (module docstring) for `pairs` (token, expert) pairs."""
    H, I = shape.hidden, shape.expert_intermediate
    return int(pairs * ((2 * H + 3 * I) * shape.dtype_bytes + 4 * max(H, I)))


def memory_items(shape: ModelShape, slots: int, on_accelerator: bool, kv_tokens: int,
                 pass_tokens: int, rule: MissRule = MissRule()) -> dict[str, dict[str, int]]:
    """Bytes per device ("accelerator", "host"), item by item, for a plan with `slots` cache slots in all.

    `kv_tokens`: the most tokens the KV cache holds; `pass_tokens`: the most tokens of one forward pass
    (the prompt's prefill); `rule`: the plan's miss rule, which says whether the transfer buffers are needed
    (`MissRule.ever_on_accelerator`) and how many pairs the CPU computes per pass (`cpu_expert_pairs`).
    """
    side = {"dense_weights": shape.dense_bytes, "kv_cache": shape.kv_bytes_per_token * kv_tokens,
            "expert_slots": slots * shape.expert_bytes, "workspace": workspace_bytes(shape, pass_tokens),
            "transfer_scratch": TRANSFER_BUFFERS * shape.expert_bytes if rule.ever_on_accelerator else 0}
    # expert bytes are those of the stored format (runtime/contracts/expert_format.py)
    host = {"experts": shape.expert_bytes_total,
            "cpu_expert_pass": cpu_expert_pass_bytes(shape, cpu_expert_pairs(shape, pass_tokens, rule))}
    quantized = is_quantized(shape.expert_format)
    if quantized:
        side["dequant_scratch"] = shape.expert_bytes_in_dtype
    if not on_accelerator:
        return {HOST: {**host, **side}}
    host["dense_weights_while_loading"] = shape.dense_bytes  # read from disk, then moved to the accelerator
    if quantized:
        host["dequant_scratch"] = shape.expert_bytes_in_dtype
    return {ACCELERATOR: {**side, "reserve": ACCELERATOR_RESERVE}, HOST: host}
