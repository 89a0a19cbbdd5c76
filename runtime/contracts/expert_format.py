"""How routed experts are stored: the format names and the bytes of one matrix and one expert, torch-free.

One definition for the runtime (loading, slots, the memory guard), the kernels and the planner (catalog,
cost model, `explain`), so that what `tune` counts is what `run` allocates. The layout itself (the
coordinator's decision, shared by all sides; runtime/quant_format.py implements it in torch):

- A routed expert's matrix W has N output rows and K inputs (transformers' fused layout: `gate_up_proj[e]`
  is [2I, H], `down_proj[e]` is [H, I]). Groups of G consecutive inputs of one row share one scale
  (G = the group size, a property of a quantized checkpoint, DEFAULT_GROUP_SIZE when `run` quantizes at
  load). K % G == 0 is required.
- int8: `qweight` int8 [N, K], values q in [-127, 127].
- int4: `qweight` uint8 [N, K/2]; byte j of a row holds input 2j in its low nibble and input 2j+1 in its
  high nibble, each as the unsigned code q + 8 (q in [-8, 7]). Read as little-endian int32 [N, K/8] these
  are compressed-tensors' `pack-quantized` `weight_packed` bytes.
- `scales` float16 [N, K/G]: w[n, k] = float(scales[n, k // G]) * q[n, k].
- Float formats store W as is, in that dtype.

Bytes of one matrix: float: N*K*size; int8: N*K + 2*N*K/G; int4: N*K/2 + 2*N*K/G.
"""
from __future__ import annotations

FLOAT_FORMATS = ("bfloat16", "float16", "float32")
INT_FORMATS = ("int8", "int4")
FORMATS = FLOAT_FORMATS + INT_FORMATS
DEFAULT_GROUP_SIZE = 32
# A group size is a multiple of this: an int4 group is then whole 32-bit words of codes (compressed-
# tensors packs 8 codes per int32) and whole 8-lane vectors for the kernels.
GROUP_SIZE_MULTIPLE = 8
MAX_GROUP_SIZE = 1 << 16

FLOAT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
SCALE_BYTES = 2  # float16 scales, as llama.cpp's Q8_0/Q4_0 store theirs
BITS = {"int8": 8, "int4": 4}


def is_quantized(fmt: str) -> bool:
    """Whether `fmt` is one of the integer formats (qweight + scales) rather than a float dtype."""
    return fmt in INT_FORMATS


def check_format(fmt: object) -> str | None:
    """None when `fmt` is a format name, else what is wrong with it (for a one-line error)."""
    if not isinstance(fmt, str) or fmt not in FORMATS:
        return f"must be one of {', '.join(FORMATS)}, got {fmt!r}"
    return None


def check_group_size(group_size: object, inputs: int | None = None) -> str | None:
    """None when `group_size` is valid (and divides `inputs`, if given), else what is wrong with it."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        return f"must be an integer, got {group_size!r}"
    if group_size < GROUP_SIZE_MULTIPLE or group_size > MAX_GROUP_SIZE or group_size % GROUP_SIZE_MULTIPLE:
        return (f"must be a multiple of {GROUP_SIZE_MULTIPLE} between {GROUP_SIZE_MULTIPLE} and "
                f"{MAX_GROUP_SIZE}, got {group_size}")
    if inputs is not None and inputs % group_size:
        return f"{group_size} does not divide a matrix's input size {inputs}"
    return None


def qweight_columns(fmt: str, inputs: int) -> int:
    """Columns of one row of `qweight` (int8: one byte per input; int4: two inputs per byte)."""
    return inputs if fmt == "int8" else inputs // 2


def matrix_bytes(fmt: str, rows: int, inputs: int, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of one expert matrix of `rows` outputs and `inputs` inputs, stored in `fmt`."""
    if fmt in FLOAT_BYTES:
        return rows * inputs * FLOAT_BYTES[fmt]
    if fmt not in INT_FORMATS:
        raise ValueError(f"unknown expert format {fmt!r} (one of {', '.join(FORMATS)})")
    groups = -(-inputs // group_size)
    return rows * qweight_columns(fmt, inputs) + SCALE_BYTES * rows * groups


def expert_matrices(hidden: int, intermediate: int, gated: bool = True) -> list[tuple[int, int]]:
    """(rows, inputs) of each matrix of one expert: the input projection ([2I, H] gate and up, or [I, H]
    without a gate) and the output projection [H, I]."""
    return [((2 if gated else 1) * intermediate, hidden), (hidden, intermediate)]


def expert_bytes(fmt: str, hidden: int, intermediate: int, gated: bool = True,
                 group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of one routed expert's weight matrices in `fmt` (biases, if any, are counted by the caller)."""
    return sum(matrix_bytes(fmt, rows, inputs, group_size)
               for rows, inputs in expert_matrices(hidden, intermediate, gated))
