"""What a profiling run measures (`Settings`), what it collects (`Results`), and the helpers that turn a
timing into a profile row: shared by the CPU jobs (run.py) and the accelerator jobs (run_cuda.py)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from runtime.contracts.expert_format import INT_FORMATS

from .measure import Timing
from .measure_dense import LayerShape
from .records import DenseRow, ExpertRow, LoopLayerRow, MoeRow, PolicyRow, StepRow

# The expert that times the fixed cost of an expert call: small enough that its arithmetic and bytes vanish.
OVERHEAD_SHAPE = (64, 64)

@dataclass(frozen=True)
class Settings:
    """What a run measures and how hard. `for_run(quick)` gives the documented defaults."""
    quick: bool
    dtypes: tuple[str, ...]  # expert kernel and dense layer dtypes
    tokens: tuple[int, ...]  # token counts of the expert kernel
    moe_tokens: tuple[int, ...]  # tokens per expert of the MoE layer's multi-token paths (run, torch)
    contexts: tuple[int, ...]  # decode contexts of the dense layer
    prefill: int  # tokens of the dense layer's prefill row
    stream_bytes: int  # DRAM read buffer
    warmup: int
    repeats: int
    min_seconds: float  # keep repeating a cheap measurement until this much timed time has passed
    pool_bytes: int | None = None  # expert pool size; None: twice the LLC (at least 256 MiB)
    # int8/int4 expert formats timed (expert and MoE-layer rows), computing in `int_dtype` (the model dtype)
    int_formats: tuple[str, ...] = INT_FORMATS
    int_dtype: str = "bfloat16"
    threads: tuple[int, ...] | None = None  # None: `thread_counts(physical cores, quick)`

    @classmethod
    def for_run(cls, quick: bool) -> "Settings":
        if quick:
            return cls(quick=True, dtypes=("bfloat16", "float32"), tokens=(1, 8, 64), moe_tokens=(1, 8, 64),
                       contexts=(32, 512), prefill=128, stream_bytes=1 << 30, warmup=1, repeats=3, min_seconds=0.05)
        return cls(quick=False, dtypes=("bfloat16", "float32", "float16"),
                   tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256), moe_tokens=(1, 8, 64), contexts=(32, 128, 512, 2048),
                   prefill=512,
                   stream_bytes=1 << 30, warmup=2, repeats=5, min_seconds=0.3)


@dataclass
class Results:
    host: dict[str, object] = field(default_factory=dict)
    memory: dict[int, float] = field(default_factory=dict)
    overhead: dict[int, float] = field(default_factory=dict)
    expert_rows: list[ExpertRow] = field(default_factory=list)
    dense_rows: list[DenseRow] = field(default_factory=list)
    moe_rows: list[MoeRow] = field(default_factory=list)
    step_rows: list[StepRow] = field(default_factory=list)
    loop_rows: list[LoopLayerRow] = field(default_factory=list)
    policy_rows: list[PolicyRow] = field(default_factory=list)
    copies: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # threads -> (bytes, seconds) each
    accelerator: dict[str, object] | None = None


def dense_row(shape: LayerShape, dtype: str, threads: int | None, tokens: int, context: int, t: Timing,
              cache: str | None = None) -> DenseRow:
    return DenseRow(hidden=shape.hidden, heads=shape.heads, kv_heads=shape.kv_heads,
                    head_dim=None if shape.head_dim == shape.hidden // shape.heads else shape.head_dim,
                    dtype=dtype, threads=threads, tokens=tokens, context=context, median_s=significant(t.median_s),
                    spread=round(t.spread, 3), cache=cache)


def unique_expert_shapes(shapes: Sequence[LayerShape]) -> list[LayerShape]:
    seen, out = set(), []
    for sh in shapes:
        if (sh.hidden, sh.intermediate) not in seen:
            seen.add((sh.hidden, sh.intermediate))
            out.append(sh)
    return out


def unique_attention_shapes(shapes: Sequence[LayerShape]) -> list[LayerShape]:
    seen, out = set(), []
    for sh in shapes:
        key = (sh.hidden, sh.heads, sh.kv_heads, sh.head_dim)
        if key not in seen:
            seen.add(key)
            out.append(sh)
    return out


def significant(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits: measurements are not more precise, and the file stays readable."""
    return float(f"{x:.{digits - 1}e}")


def router_width(shapes: Sequence[LayerShape]) -> Callable[[DenseRow], int]:
    """The router width of the shape a dense row was measured for."""
    by_key = {(sh.hidden, sh.heads, sh.kv_heads, sh.head_dim): sh.num_experts for sh in shapes}

    def width(row: DenseRow) -> int:
        head_dim = row.head_dim or row.hidden // row.heads
        return by_key.get((row.hidden, row.heads, row.kv_heads, head_dim), 0)
    return width
