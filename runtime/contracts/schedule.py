"""What the runtime's schedule overlaps, stated once for the cost model (which charges it) to read.

Torch-free: the planner imports it.
"""
from __future__ import annotations

# Whether a CUDA plan's MoE layer computes its CPU misses while the accelerator computes its hits (the
# CUDA execution order of docs/run.md, step 3). Not yet: the CPU side begins with a blocking copy of the
# hidden states to the host (runtime/cpu_executor.py, `run`), which waits for the hit kernels queued before
# it, so the two sides run one after the other, and the cost model adds them up. The runtime change that
# makes them overlap sets this to True.
CPU_OVERLAPS_ACCELERATOR = False
