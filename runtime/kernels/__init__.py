"""The CPU kernels: the GEMV kernel (gemv.c; int8 and int4 experts in qgemv.c) and the dense part's decode
operations (decode_ops.c, wrapped in decode_ops.py), compiled on first use into one library with the system C
compiler, loaded with ctypes.

Each dtype gets the best instruction set the CPU has: AVX-512 (with AVX512-BF16 for bf16), else AVX2 with
FMA. The int8 and int4 kernels have one path, AVX2 with FMA and F16C (an AVX-512 CPU runs it too). Where
there is none, no compiler, or the build fails, `load()` returns None and the executor uses torch's own
matmul: the kernel is a speed-up, never a requirement.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SOURCES = [HERE / "gemv.c", HERE / "qgemv.c", HERE / "qgemv_vnni.c", HERE / "decode_ops.c"]
HEADERS = [HERE / "bf16.h", HERE / "block_bf16_avx512.h", HERE / "hsum.h", HERE / "stream_access.h", HERE / "dequant.h", HERE / "q4planes.h", HERE / "silu_gate.h",
           HERE / "block_f32.h"]
ISA_AVX2, ISA_AVX512 = 1, 2  # as in gemv.c
ISA_AVX2_VNNI = 3  # the int kernels only: qgemv.c's AVX2 code built with AVX512-VNNI (qgemv_vnni.c)
INT_FORMATS = {"int8": 1, "int4": 2}  # as FMT_INT8, FMT_INT4 in qgemv.c
INT_MODEL_DTYPES = (torch.bfloat16, torch.float32)  # the model dtypes (inputs, outputs) the int kernels take


def _kernel_wins(isa: int, dtype: torch.dtype, tokens: int, threads: int, amx: bool | None = None) -> bool:
    """Where the kernel beats torch's matmul, as measured with bench/cpu_kernel.py on a Mixtral-sized
    expert; the rule depends on the instruction set because torch's own matmul does.

    AVX-512 with AVX512-BF16 and AMX (Intel, bench/results/cpu_kernel_avx512.md): bf16 wins at one token
    (1.5-1.7x) and loses from four (0.7-0.9x: oneDNN's bf16 GEMM reuses each weight load across
    tokens); fp32 wins up to four tokens on one thread (1.2-1.4x) but lost at one token on two (0.8x)
    before the one-token path read its rows as far-apart streams. AMD Zen 4 (AVX-512 with AVX512-BF16, no
    AMX; bench/results/cpu_kernel_avx512_zen4.md) with those streams: bf16 1.8-2.4x torch at one token;
    fp32 at one token 1.4x on one thread and 1.8x on two, so one token runs on the kernel at any thread count
    (the Intel machine has not run the streams). From two tokens the bf16 kernel multiplies four rows by four
    tokens blocked for L1 (gemv.c, block_bf16_tokens_avx512): on Zen 4 1.09-1.55x torch at two and four
    tokens on one and two threads, 1.01-1.32x at 8 and 16, 0.83-1.05x from 32 (two runs), so
    without AMX (`amx`: the CPU flags when not given) bf16 takes the kernel up to four tokens; with AMX
    oneDNN's GEMM keeps everything from two, as measured on the Intel machine with the older kernel.
    AVX2 (bench/results/cpu_kernel_avx2_run2.md; earlier runs in docs/benchmarks.md): torch has no native bf16 and its fp32 GEMM reaches
    about 30 GFLOP/s on two cores, so the kernel wins at most token counts measured (bf16 1.3-2.9x up to 64
    tokens, fp32 1.2-5x up to 32 on two threads). On one thread fp32 is close to even: at one token the
    four-stream kernel was 0.98-1.30x torch in ten cells of five runs, and 1.04-1.10x in the four cells of
    the two runs where they took turns repeat by repeat (_run2.md), so it is used; at 32 tokens 0.86-1.36x
    across runs (0.86-0.98x where they took turns: noted, not yet acted on). Those measurements predate the
    L1-blocked product from eight tokens (gemv.c, BLOCK_TOKENS: 1.2-1.7x the old kernel at 16-96 tokens,
    docs/benchmarks.md), which only widens the kernel's lead where it already won. With it, fp32 at 48 and
    64 tokens (bench/results/few_token_kernel_avx2.md, two runs): on two threads the kernel is 1.03-1.67x
    torch in all eight cells, so it runs up to 64 tokens there; on one thread 0.89-1.07x, so torch keeps
    them past 32. More tokens than a call holds (64) run in pieces, and the rule is asked about the largest
    piece (GemvKernel.handles).
    """
    if isa == ISA_AVX512:
        if dtype == torch.bfloat16:
            return tokens <= (1 if (_cpu_has_amx() if amx is None else amx) else 4)
        return tokens <= 1 or (threads == 1 and tokens <= 4)
    if dtype == torch.bfloat16:
        return tokens <= 64
    return tokens <= (64 if threads > 1 else 32)


@lru_cache(maxsize=1)
def _cpu_has_amx() -> bool:
    """Whether this CPU has AMX for bf16 (read once: the rule is asked on the decode path)."""
    return "amx_bf16" in cpu_flags()


def _split_input_floats(isa: int, dtype: torch.dtype, k: int) -> int:
    """Scratch floats per input row of K values: the AVX2 bf16 path widens each input row to fp32 once,
    split into its even and odd elements (gemv.c, split_bf16); no scratch otherwise."""
    return 2 * ((k + 1) // 2) if isa == ISA_AVX2 and dtype == torch.bfloat16 else 0


def _int_kernel_wins(fmt: str, dtype: torch.dtype, tokens: int, threads: int) -> bool:
    """Where the int8/int4 kernel beats torch's dequantize-then-matmul: everywhere it runs (1 to 64 tokens).

    Measured with bench/cpu_kernel.py --int-formats (two experts per call, AVX2, a shared machine,
    bench/results/cpu_kernel_int_avx2.md): the kernel took 1/10 to 1/40 of torch's time at one token on the
    benchmark model's expert (hidden 1024, intermediate 3584) and 1/47 to 1/76 on Mixtral's, 1/3.6 to 1/4.7
    at 64 tokens, on one thread and on two, int8 and int4 alike: torch dequantizes every weight of the expert into a bf16 matrix before its matmul, which
    costs more than the kernel's whole product, and on AVX2 its bf16 matmul is slower than the bf16 kernel
    up to 64 tokens anyway (_kernel_wins). One rule for both formats, thread counts and model dtypes."""
    return True


def _pieces(tokens: int, limit: int) -> list[tuple[int, int]]:
    """[start, stop) token ranges of at most `limit` (the kernels' tokens per matrix and call), as even as
    they can be: a prefill's popular expert takes more tokens than one call holds."""
    count = -(-tokens // limit)
    return [(tokens * i // count, tokens * (i + 1) // count) for i in range(count)]


def _piece_tokens(tokens: int, limit: int) -> int:
    """The largest piece `_pieces` cuts `tokens` into: the token count a rule is asked about."""
    return -(-tokens // -(-tokens // limit))


def _by_pieces(call: Callable[..., list[torch.Tensor]], weights: list, inputs: list[torch.Tensor], limit: int,
               threads: int, out_dtype: torch.dtype) -> list[torch.Tensor]:
    """`call` (GemvKernel.multi or qmulti) on every input cut into `_pieces` of at most `limit` tokens, each
    piece with its input's weights, all in one call; the pieces' outputs put back together per input."""
    pieces = [(i, a, b) for i, x in enumerate(inputs) for a, b in _pieces(x.shape[0], limit)]
    outs = call([weights[i] for i, _, _ in pieces], [inputs[i][a:b] for i, a, b in pieces], threads, out_dtype)
    parts: list[list[torch.Tensor]] = [[] for _ in inputs]
    for (i, _, _), y in zip(pieces, outs):
        parts[i].append(y)
    return [p[0] if len(p) == 1 else torch.cat(p) for p in parts]


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def instruction_sets(flags: set[str]) -> dict[torch.dtype, int]:
    """The kernel's instruction set for each dtype this CPU can run it in."""
    isa: dict[torch.dtype, int] = {}
    if "avx2" in flags and "fma" in flags:
        isa = {torch.float32: ISA_AVX2, torch.bfloat16: ISA_AVX2}
    if "avx512f" in flags:
        isa[torch.float32] = ISA_AVX512
        if "avx512_bf16" in flags:
            isa[torch.bfloat16] = ISA_AVX512
    return isa


def int_instruction_set(flags: set[str]) -> int | None:
    """The int8/int4 kernels' instruction set on this CPU: AVX2 with FMA and F16C (float16 scales), with
    AVX512-VNNI on 256-bit registers where the CPU has it (one token's int4 sums, 1.15x on AMD Zen 4), or None."""
    if not {"avx2", "fma", "f16c"} <= flags:
        return None
    return ISA_AVX2_VNNI if {"avx512_vnni", "avx512vl"} <= flags else ISA_AVX2


def int_layout(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[str, int, int]:
    """(format, inputs K, group size G) of one quantized matrix: qweight int8 [N, K] (int8) or uint8 [N, K/2]
    (int4), scales float16 [N, K/G] (runtime/contracts/expert_format.py)."""
    fmt = {torch.int8: "int8", torch.uint8: "int4"}.get(qweight.dtype)
    if fmt is None or scales.dtype != torch.float16 or qweight.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"not an int8/int4 matrix: qweight {qweight.dtype} {tuple(qweight.shape)}, "
                         f"scales {scales.dtype} {tuple(scales.shape)}")
    k = qweight.shape[1] * (2 if fmt == "int4" else 1)
    groups = scales.shape[1]
    if scales.shape[0] != qweight.shape[0] or groups == 0 or k % groups or (k // groups) % 8:
        raise ValueError(f"scales {tuple(scales.shape)} do not fit qweight {tuple(qweight.shape)} ({fmt}): "
                         "one scale per group of a multiple of 8 inputs")
    return fmt, k, k // groups


class Scratch:
    """A float32 buffer reused between kernel calls, grown on demand (kernels are called from one thread)."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.float32)

    def ptr(self, floats: int) -> int:
        if self._buffer.numel() < floats:
            self._buffer = torch.empty(floats, dtype=torch.float32)
        return self._buffer.data_ptr()


class GemvKernel:
    def __init__(self, lib: ctypes.CDLL, isa: dict[torch.dtype, int], int_isa: int | None = None) -> None:
        self._fn = lib.gemv_multi
        self._fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                             ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p),
                             ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                             ctypes.c_void_p, ctypes.c_int]
        self._fn.restype = None
        self._one = lib.gemv_one
        self._one.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                              ctypes.c_int]
        self._one.restype = None
        self._token = lib.moe_token
        self._token.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                                ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.POINTER(ctypes.c_float),
                                ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
        self._token.restype = None
        self.max_tokens = int(lib.gemv_max_tokens())
        self.isa = dict(isa)  # dtype -> instruction set: the dtypes this kernel runs
        self._scratch_ptr = Scratch().ptr
        pointers = ctypes.POINTER(ctypes.c_void_p)
        vnni = int_isa == ISA_AVX2_VNNI  # qgemv_vnni.c's entry points, same arguments
        self._qmulti = lib.qgemv_multi_vnni if vnni else lib.qgemv_multi
        self._qmulti.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, pointers, pointers, pointers, pointers,
                                 ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self._qmulti.restype = None
        self._qtoken = lib.qmoe_token_vnni if vnni else lib.qmoe_token
        self._qtoken.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, pointers, pointers, pointers, pointers,
                                 ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
        self._qtoken.restype = None
        self.int_isa = int_isa  # the int8/int4 kernels' instruction set, None where they cannot run
        self.int_max_tokens = int(lib.qgemv_max_tokens())
        lib.qgemv_row_floats.argtypes = [ctypes.c_int64]
        lib.qgemv_row_floats.restype = ctypes.c_int64
        # scratch floats of one prepared one-token input row, asked once per input size (a call per layer
        # and token would be a ctypes round trip on the decode path)
        self._qrow_floats = lru_cache(maxsize=None)(lib.qgemv_row_floats)

    def isa_names(self) -> dict[torch.dtype, str]:
        return {dtype: {ISA_AVX2: "avx2", ISA_AVX512: "avx512"}[isa] for dtype, isa in self.isa.items()}

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self.isa

    def handles(self, dtype: torch.dtype, tokens: int, threads: int) -> bool:
        """Whether this kernel beats torch's matmul here (see _kernel_wins): more tokens than one call holds
        run in pieces (`multi`, `linear`), so the rule is asked about the largest piece."""
        if dtype not in self.isa or tokens < 1:
            return False
        return _kernel_wins(self.isa[dtype], dtype, _piece_tokens(tokens, self.max_tokens), threads)

    def supports_int(self, fmt: str, dtype: torch.dtype) -> bool:
        """Whether the int kernels run `fmt` experts in a model of `dtype` (inputs and outputs) here."""
        return self.int_isa is not None and fmt in INT_FORMATS and dtype in INT_MODEL_DTYPES

    def handles_int(self, fmt: str, dtype: torch.dtype, tokens: int, threads: int) -> bool:
        """Whether the int kernel beats torch's dequantize-then-matmul here (see _int_kernel_wins)."""
        if not self.supports_int(fmt, dtype) or tokens < 1:
            return False
        return _int_kernel_wins(fmt, dtype, _piece_tokens(tokens, self.int_max_tokens), threads)

    def qmulti(self, weights: list[tuple[torch.Tensor, torch.Tensor]], inputs: list[torch.Tensor], threads: int,
               out_dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """`multi` for quantized matrices: [x_i @ dequantized(W_i)^T for each i] as [T_i, N]. weights[i] is
        (qweight, scales) of one matrix (int_layout), all of the same shape and format, contiguous; x_i
        [T_i, K] contiguous in the model's dtype (bf16 or fp32): the weights are dequantized as the reference
        dequantizes them into that dtype. Sums in fp32; `out_dtype` bfloat16 rounds as torch's bf16 matmul."""
        tokens = [x.shape[0] for x in inputs]
        if max(tokens) > self.int_max_tokens:  # qgemv.c's per-item buffer holds QMAXT tokens
            return _by_pieces(self.qmulti, weights, inputs, self.int_max_tokens, threads, out_dtype)
        count = len(weights)
        qweight, scales = weights[0]
        fmt, k, group = int_layout(qweight, scales)
        n = qweight.shape[0]
        dtype = inputs[0].dtype
        if not self.supports_int(fmt, dtype):
            raise ValueError(f"the int kernels do not run {fmt} experts with {dtype} inputs on this CPU")
        out_bf16 = out_dtype == torch.bfloat16
        outs = [torch.empty((t, n), dtype=torch.bfloat16 if out_bf16 else torch.float32) for t in tokens]
        ptrs = ctypes.c_void_p * count
        self._qmulti(INT_FORMATS[fmt], int(dtype == torch.bfloat16), count, ptrs(*[w.data_ptr() for w, _ in weights]),
                     ptrs(*[s.data_ptr() for _, s in weights]), ptrs(*[x.data_ptr() for x in inputs]),
                     ptrs(*[y.data_ptr() for y in outs]), (ctypes.c_int64 * count)(*tokens), n, k, group, threads,
                     self._scratch_ptr(count * max(max(tokens) * k, self._qrow_floats(k))), int(out_bf16),
                     # bf16 rows from a few tokens through the AVX512-BF16 product where bf16 runs on it (qgemv.c)
                     int(self.isa.get(torch.bfloat16) == ISA_AVX512))
        return outs

    def qmoe_token(self, w_in: list[tuple[torch.Tensor, torch.Tensor]], w_out: list[tuple[torch.Tensor, torch.Tensor]],
                   x: torch.Tensor, gate_weights: list[float], threads: int) -> torch.Tensor:
        """`moe_token` for quantized experts: w_in[i] is (qweight, scales) of the [2I, H] input projection,
        w_out[i] of the [H, I] output projection, one group size for both; x holds the H values, contiguous,
        bf16 or fp32 (the model's dtype, which the weights are dequantized into). Returns x's shape and dtype."""
        count = len(w_in)
        fmt, hidden, group = int_layout(*w_in[0])
        inter = w_in[0][0].shape[0] // 2
        if not self.supports_int(fmt, x.dtype):
            raise ValueError(f"the int kernels do not run {fmt} experts with {x.dtype} inputs on this CPU")
        out = torch.empty_like(x)
        ptrs = ctypes.c_void_p * count
        self._qtoken(INT_FORMATS[fmt], int(x.dtype == torch.bfloat16), count, ptrs(*[w.data_ptr() for w, _ in w_in]),
                     ptrs(*[s.data_ptr() for _, s in w_in]), ptrs(*[w.data_ptr() for w, _ in w_out]),
                     ptrs(*[s.data_ptr() for _, s in w_out]), x.data_ptr(), (ctypes.c_float * count)(*gate_weights),
                     out.data_ptr(), hidden, inter, group, threads,
                     self._scratch_ptr(self._qrow_floats(hidden)
                                       + count * (2 * inter + self._qrow_floats(inter) + hidden)))
        return out

    def multi(self, weights: list[torch.Tensor], inputs: list[torch.Tensor], threads: int,
              out_dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """[x_i @ W_i^T for each i] as [T_i, N]; every W_i is [N, K] contiguous, x_i [T_i, K] contiguous.

        The products accumulate in fp32; `out_dtype` bfloat16 (with bf16 weights) rounds them as torch's
        bf16 matmul rounds its output."""
        tokens = [x.shape[0] for x in inputs]
        if max(tokens) > self.max_tokens:  # gemv.c's per-item buffer holds MAXT tokens
            return _by_pieces(self.multi, weights, inputs, self.max_tokens, threads, out_dtype)
        count = len(weights)
        n, k = weights[0].shape
        dtype = weights[0].dtype
        out_bf16 = out_dtype == torch.bfloat16
        outs = [torch.empty((t, n), dtype=torch.bfloat16 if out_bf16 else torch.float32) for t in tokens]
        isa = self.isa[dtype]
        per_row = _split_input_floats(isa, dtype, k)
        scratch = self._scratch_ptr(count * max(tokens) * per_row) if per_row else None
        ptrs = ctypes.c_void_p * count
        self._fn(isa, int(dtype == torch.bfloat16), count, ptrs(*[w.data_ptr() for w in weights]),
                 ptrs(*[x.data_ptr() for x in inputs]), ptrs(*[y.data_ptr() for y in outs]),
                 (ctypes.c_int64 * count)(*tokens), n, k, threads, scratch, int(out_bf16))
        return outs

    def linear(self, weight: torch.Tensor, x: torch.Tensor, threads: int, out_dtype: torch.dtype) -> torch.Tensor:
        """x @ weight^T for one matrix: `multi` with a single item, at less per-call cost (the dense
        projections call it 30-odd times per token). weight [N, K] and x [T, K] contiguous; more than
        max_tokens run in pieces."""
        n, k = weight.shape
        tokens = x.shape[0]
        if tokens > self.max_tokens:
            return torch.cat([self.linear(weight, x[a:b], threads, out_dtype) for a, b in _pieces(tokens, self.max_tokens)])
        out_bf16 = out_dtype == torch.bfloat16
        out = torch.empty((tokens, n), dtype=torch.bfloat16 if out_bf16 else torch.float32)
        isa = self.isa[weight.dtype]
        is_bf16 = weight.dtype == torch.bfloat16
        per_row = _split_input_floats(isa, weight.dtype, k)
        scratch = self._scratch_ptr(tokens * per_row) if per_row else None
        self._one(isa, is_bf16, weight.data_ptr(), x.data_ptr(), out.data_ptr(), tokens, n, k, threads, scratch,
                  out_bf16)
        return out

    def one_token(self, weight: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, int], None]:
        """`linear` for one token with all that depends on the weight alone worked out once: the returned
        `call(x, out, threads)` writes x @ weight^T into out. x holds the K inputs and out room for the N
        outputs, both contiguous in the weight's dtype (any shape); the weight is read through its
        `data_ptr()` at each call, so a weight re-pointed after this (runtime/huge_pages.py) is followed.
        Why: the dense projections call this some thirty times per decode token, and on the AVX2
        development machine `linear`'s per-call shape, dtype and scratch work cost as much as the call."""
        n, k = weight.shape
        isa = self.isa[weight.dtype]
        is_bf16 = int(weight.dtype == torch.bfloat16)
        scratch_floats = _split_input_floats(isa, weight.dtype, k)
        kernel = self  # the entry point is looked up at each call: benchmarks swap it (bench/diagnostics/decode_ab.py)

        def call(x: torch.Tensor, out: torch.Tensor, threads: int) -> None:
            kernel._one(isa, is_bf16, weight.data_ptr(), x.data_ptr(), out.data_ptr(), 1, n, k, threads,
                        kernel._scratch_ptr(scratch_floats) if scratch_floats else None, is_bf16)

        return call

    def moe_token(self, w_in: list[torch.Tensor], w_out: list[torch.Tensor], x: torch.Tensor,
                  gate_weights: list[float], threads: int) -> torch.Tensor:
        """One token through several SiLU-gated experts, weighted and summed: x's shape and dtype.

        w_in[i] is [2I, H] (gate rows, then up rows), w_out[i] [H, I], all contiguous; x holds the H values
        ([H], [1, H], ...), contiguous, in the weights' dtype. bf16 is rounded where torch's bf16 ops round
        (see moe_token in gemv.c)."""
        count = len(w_in)
        inter2, hidden = w_in[0].shape
        inter = inter2 // 2
        dtype = w_in[0].dtype
        out = torch.empty_like(x)
        ptrs = ctypes.c_void_p * count
        self._token(self.isa[dtype], int(dtype == torch.bfloat16), count, ptrs(*[w.data_ptr() for w in w_in]),
                    ptrs(*[w.data_ptr() for w in w_out]), x.data_ptr(), (ctypes.c_float * count)(*gate_weights),
                    out.data_ptr(), hidden, inter, threads, self._scratch_ptr(count * (4 * inter + 2 + hidden)))
        return out


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moeplan"


@lru_cache(maxsize=1)
def library() -> tuple[ctypes.CDLL, dict[torch.dtype, int]] | None:
    """The compiled library and the instruction set of each dtype, or None where it cannot be built here."""
    if os.environ.get("MOEPLAN_NO_KERNEL"):
        return None
    isa = instruction_sets(cpu_flags())
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not isa or compiler is None:
        log.debug("CPU kernels unavailable (instruction sets: %s, compiler: %s)", isa, compiler)
        return None
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    digest = hashlib.sha256(source + compiler.encode()).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [compiler, "-O3", "-fopenmp", "-shared", "-fPIC", *map(str, SOURCES), "-o", tmp, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            Path(tmp).unlink(missing_ok=True)
            log.debug("CPU kernels did not build: %s", proc.stderr[-500:])
            return None
        os.replace(tmp, target)
    try:
        return ctypes.CDLL(str(target)), isa
    except OSError as exc:
        log.debug("CPU kernels did not load: %s", exc)
        return None


@lru_cache(maxsize=1)
def load() -> GemvKernel | None:
    """The GEMV kernel, or None: the executor then uses torch's matmul."""
    built = library()
    return GemvKernel(*built, int_isa=int_instruction_set(cpu_flags())) if built is not None else None
