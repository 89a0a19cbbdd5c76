"""Hardware profiles: what they hold (records, profile), how they are read and written (schema), and how
they are measured (measure*, run*: these import torch and are imported by the `profile` command only).

The names below are torch-free: the cost model and the tuner import them.
"""
from .profile import Profile
from .records import (DTYPE_BYTES, SCHEMA_VERSION, SOURCES, AcceleratorProfile, CpuProfile, DenseRow, ExpertRow, HostInfo,
                      ProfileError, TransferRow, expert_bytes, expert_flops, interpolate)

__all__ = ["DTYPE_BYTES", "SCHEMA_VERSION", "SOURCES", "AcceleratorProfile", "CpuProfile", "DenseRow", "ExpertRow",
           "HostInfo", "Profile", "ProfileError", "TransferRow", "expert_bytes", "expert_flops", "interpolate"]
