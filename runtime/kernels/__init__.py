"""The CPU GEMV kernel (gemv.c): compiled on first use with the system C compiler, loaded with ctypes.

Where there is no compiler, no AVX-512 (or no AVX512-BF16 for bf16), or the build fails, `load()` returns
None and the executor uses torch's own matmul: the kernel is a speed-up, never a requirement.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("gemv.c")
BF16_MAX_TOKENS = 1  # token counts up to which the kernel is used: see GemvKernel.handles
F32_MAX_TOKENS = 4  # and on one thread only


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


class GemvKernel:
    def __init__(self, lib: ctypes.CDLL, dtypes: frozenset[torch.dtype]) -> None:
        self._fn = lib.gemv_multi
        self._fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                             ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p),
                             ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        self._fn.restype = None
        self.max_tokens = int(lib.gemv_max_tokens())
        self.dtypes = dtypes

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self.dtypes

    def handles(self, dtype: torch.dtype, tokens: int, threads: int) -> bool:
        """Whether this kernel beats torch's matmul here. Measured with bench/cpu_kernel.py on a
        Mixtral-sized expert (bench/results/cpu_kernel.md): bf16 wins at one token (1.5-1.7x) and
        loses from four (0.7-0.9x: oneDNN's bf16 GEMM reuses each weight load across tokens); fp32 wins
        up to four tokens on one thread (1.2-1.4x) but loses at one token on two (0.8x)."""
        if dtype not in self.dtypes:
            return False
        if dtype == torch.bfloat16:
            return tokens <= min(BF16_MAX_TOKENS, self.max_tokens)
        return threads == 1 and tokens <= min(F32_MAX_TOKENS, self.max_tokens)

    def multi(self, weights: list[torch.Tensor], inputs: list[torch.Tensor], threads: int) -> list[torch.Tensor]:
        """[x_i @ W_i^T for each i] as fp32 [T_i, N]; every W_i is [N, K] contiguous, x_i [T_i, K] contiguous."""
        count = len(weights)
        n, k = weights[0].shape
        outs = [torch.empty((x.shape[0], n), dtype=torch.float32) for x in inputs]
        ptrs = ctypes.c_void_p * count
        self._fn(int(weights[0].dtype == torch.bfloat16), count, ptrs(*[w.data_ptr() for w in weights]),
                 ptrs(*[x.data_ptr() for x in inputs]), ptrs(*[y.data_ptr() for y in outs]),
                 (ctypes.c_int64 * count)(*[x.shape[0] for x in inputs]), n, k, threads)
        return outs


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moeplan"


@lru_cache(maxsize=1)
def load() -> GemvKernel | None:
    if os.environ.get("MOEPLAN_NO_KERNEL"):
        return None
    flags = cpu_flags()
    dtypes = set()
    if "avx512f" in flags:
        dtypes.add(torch.float32)
        if "avx512_bf16" in flags:
            dtypes.add(torch.bfloat16)
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not dtypes or compiler is None:
        log.debug("CPU GEMV kernel unavailable (avx512f: %s, compiler: %s)", "avx512f" in flags, compiler)
        return None
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + compiler.encode()).hexdigest()[:16]
    target = _cache_dir() / f"gemv-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [compiler, "-O3", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            Path(tmp).unlink(missing_ok=True)
            log.debug("CPU GEMV kernel did not build: %s", proc.stderr[-500:])
            return None
        os.replace(tmp, target)
    try:
        return GemvKernel(ctypes.CDLL(str(target)), frozenset(dtypes))
    except OSError as exc:
        log.debug("CPU GEMV kernel did not load: %s", exc)
        return None
