"""What the runtime's schedule overlaps and how often it blocks, stated once for the cost model to charge.

Torch-free: the planner imports it. The numbers are the runtime's, checked by
tests/runtime/test_cuda_schedule.py through the device seam (runtime/device.py).
"""
from __future__ import annotations

# Whether a CUDA plan's MoE layer computes its CPU misses while the accelerator computes its hits (the
# CUDA execution order of DESIGN.md, step 3): yes. The layer's one host sync comes first, the hits (and
# accelerator misses) are queued on the compute stream, the CPU misses run on the CPU threads, and their
# sum goes back without a blocking copy (runtime/moe_layer.py, `_forward_accelerated`). The layer costs
# max(accelerator side, CPU side), not their sum.
CPU_OVERLAPS_ACCELERATOR = True

# Blocking host syncs per MoE layer per forward pass on a CUDA plan: the one that brings the router's ids,
# its gate weights and the hidden states to the host together. Replayed routing adds none.
HOST_SYNCS_PER_MOE_LAYER = 1

# Whether promotion and prefetch copies read host memory while the CPU threads stream the CPU misses from
# it: yes, on a CUDA plan they are queued before the CPU work starts (they share the DRAM bandwidth).
COPIES_SHARE_DRAM_WITH_CPU_MISSES = True

# How many buffers a CUDA plan's transfers (accelerator misses that take no slot) are copied into, in turn
# (runtime/transfer_buffers.py; the memory accounting's `transfer_scratch` counts them all). Two: the copy
# of transfer i+1 runs on the copy stream while transfer i is computed (`MoeLayer._transfers`), so a
# layer's transfers cost about the first copy, then the larger of each copy and each compute, then the last
# compute, rather than every copy plus every compute.
TRANSFER_BUFFERS = 2
