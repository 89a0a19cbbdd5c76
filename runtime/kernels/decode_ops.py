"""ctypes wrappers of decode_ops.c: RMSNorm and one-query attention for the dense part at decode."""
from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from . import Scratch, library

DTYPES = (torch.float32, torch.bfloat16)


class DecodeOps:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._norm = lib.rms_norm
        self._norm.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                               ctypes.c_int64, ctypes.c_float]
        self._norm.restype = None
        self._attend = lib.attend_one
        self._attend.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 *[ctypes.c_int64] * 9, ctypes.c_float, ctypes.c_int, ctypes.c_void_p]
        self._attend.restype = None
        self._scratch_ptr = Scratch().ptr

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """transformers' Llama-style RMSNorm of x over its last dimension; x contiguous, weight in x's dtype."""
        hidden = x.shape[-1]
        y = torch.empty_like(x)
        self._norm(int(x.dtype == torch.bfloat16), x.data_ptr(), weight.data_ptr(), y.data_ptr(),
                   x.numel() // hidden, hidden, eps)
        return y

    def attend_one(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                   threads: int) -> torch.Tensor:
        """Unmasked attention of one query, in the attention interface's layout: query [1, Hq, 1, D], key and
        value [1, Hkv, L, D] (any head and position strides, D contiguous), all one dtype; returns
        [1, 1, Hq, D] (sdpa_attention_forward's output layout)."""
        _, heads, _, dim = query.shape
        _, kv_heads, length, _ = key.shape
        out = torch.empty((1, 1, heads, dim), dtype=query.dtype)
        scratch = self._scratch_ptr(heads * (length + dim))
        self._attend(int(query.dtype == torch.bfloat16), query.data_ptr(), key.data_ptr(), value.data_ptr(),
                     out.data_ptr(), heads, kv_heads, length, dim, query.stride(1), key.stride(1), key.stride(2),
                     value.stride(1), value.stride(2), scale, threads, scratch)
        return out


@lru_cache(maxsize=1)
def load_decode_ops() -> DecodeOps | None:
    """The decode operations, or None where the kernels cannot be built here (then torch's ops run)."""
    built = library()
    return DecodeOps(built[0]) if built is not None else None
