"""ctypes wrappers of decode_ops.c: RMSNorm, one-query attention and the router for the dense part at decode."""
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
        # the native decode step's calls (runtime/native_decode.py binds them with its own buffers' addresses)
        self.add_rms_norm_raw = lib.add_rms_norm
        self.add_rms_norm_raw.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 5, ctypes.c_int64, ctypes.c_float]
        self.add_rms_norm_raw.restype = None
        self.rope_append_attend_raw = lib.rope_append_attend
        self.rope_append_attend_raw.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 7, *[ctypes.c_int64] * 8,
                                                ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        self.rope_append_attend_raw.restype = None
        self._route = lib.route_one
        self._route.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                ctypes.c_void_p, ctypes.c_void_p]
        self._route.restype = ctypes.c_int
        self._scratch_ptr = Scratch().ptr

    def route_one(self, x: torch.Tensor, weight: torch.Tensor, k: int, normalize: bool,
                  scores_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A softmax top-k router on one token x [1, H] with weight [E, H] (contiguous, x's dtype): (logits
        [1, E] in x's dtype, scores [1, k] in scores_dtype, indices [1, k]), as the routers of Mixtral,
        Qwen-MoE and OLMoE return them; None where probabilities tie at the top (torch orders ties its own
        way: the caller runs the module then)."""
        experts, hidden = weight.shape
        logits = torch.empty((1, experts), dtype=x.dtype)
        scores = torch.empty((1, k), dtype=scores_dtype)
        index = torch.empty((1, k), dtype=torch.int64)
        tied = self._route(int(x.dtype == torch.bfloat16), x.data_ptr(), weight.data_ptr(), logits.data_ptr(),
                           experts, hidden, k, int(normalize), scores.data_ptr(),
                           int(scores_dtype == torch.bfloat16), index.data_ptr(), self._scratch_ptr(hidden + experts))
        return None if tied else (logits, scores, index)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """transformers' Llama-style RMSNorm of x over its last dimension; x contiguous, weight in x's dtype.
        `out`: where to write it (x's shape, contiguous; x itself is fine), else a new tensor."""
        hidden = x.shape[-1]
        y = torch.empty_like(x) if out is None else out
        self._norm(int(x.dtype == torch.bfloat16), x.data_ptr(), weight.data_ptr(), y.data_ptr(),
                   x.numel() // hidden, hidden, eps)
        return y

    def add_rms_norm(self, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float,
                     total: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(a + b, RMSNorm(a + b)) as torch's add and `rms_norm` give them: a decoder layer's residual add and
        the norm after it. All [..., H] contiguous in one dtype; `total` (a or b is fine) receives the sum."""
        total = torch.empty_like(a) if total is None else total
        y = torch.empty_like(a)
        self.add_rms_norm_raw(int(a.dtype == torch.bfloat16), a.data_ptr(), b.data_ptr(), total.data_ptr(),
                              weight.data_ptr(), y.data_ptr(), a.shape[-1], eps)
        return total, y

    def rope_append_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, length: int,
                           scale: float, threads: int) -> torch.Tensor:
        """One token's attention after its projections: q [Hq, D] and k [Hkv, D] rotated in place (transformers'
        apply_rotary_pos_emb with cos, sin [D]), k and v [Hkv, D] written at position `length` of the caches
        [1, Hkv, capacity, D] (D contiguous, capacity > length), then attention of q over the first
        length + 1 positions: [1, 1, Hq, D], as `attend_one` gives it."""
        heads, dim = q.shape
        kv_heads = k.shape[0]
        out = torch.empty((1, 1, heads, dim), dtype=q.dtype)
        self.rope_append_attend_raw(int(q.dtype == torch.bfloat16), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                    cos.data_ptr(), sin.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                                    heads, kv_heads, length, dim, key_cache.stride(1), key_cache.stride(2),
                                    value_cache.stride(1), value_cache.stride(2), scale, threads,
                                    self.scratch(heads * (length + 1 + dim)), out.data_ptr())
        return out

    def scratch(self, floats: int) -> int:
        """The address of the shared fp32 scratch, at least `floats` long (attention's working memory)."""
        return self._scratch_ptr(floats)

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
