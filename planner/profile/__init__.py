"""Hardware profiles: what they hold (records, profile), how they are read and written (schema), and how
they are measured (measure*, run*: these import torch and are imported by the `profile` command only).

The names below are torch-free: the cost model and the tuner import them.
"""
from .profile import Profile
from .records import (CACHE_STATES, DTYPE_BYTES, MOE_PATHS, SCHEMA_VERSION, SOURCES, AcceleratorProfile, CpuProfile,
                      DenseRow, ExpertRow, HostInfo, MoeRow, ProfileError, StepRow, TransferRow, expert_bytes,
                      expert_flops, interpolate)

__all__ = ["CACHE_STATES", "DTYPE_BYTES", "MOE_PATHS", "SCHEMA_VERSION", "SOURCES", "AcceleratorProfile", "CpuProfile",
           "DenseRow", "ExpertRow", "HostInfo", "MoeRow", "Profile", "ProfileError", "StepRow", "TransferRow",
           "expert_bytes", "expert_flops", "interpolate"]
