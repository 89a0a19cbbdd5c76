"""How the benchmarks hand over their Markdown tables: printed, and written whole to --out if given."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.atomic import write_atomic  # noqa: E402


def cpu_line() -> str:
    """A results file's CPU line: the model name and family/model from /proc/cpuinfo, and the instruction set
    the kernels run on this CPU (bf16/fp32 and int), so that a result says which kernel path it measured."""
    from runtime.kernels import cpu_flags, instruction_sets, int_instruction_set

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = cpu_flags()
    names = {1: "AVX2", 2: "AVX-512", 3: "AVX2 with AVX512-VNNI"}
    isa = {str(d).split(".")[1]: names[i] for d, i in instruction_sets(flags).items()}
    int_isa = int_instruction_set(flags)
    return (f"- CPU: {fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')} model "
            f"{fields.get('model', '?')}), AVX-512 {'yes' if 'avx512f' in flags else 'no'}, AVX512-BF16 "
            f"{'yes' if 'avx512_bf16' in flags else 'no'}, AMX {'yes' if 'amx_tile' in flags else 'no'}; the kernels' "
            f"instruction set: {isa or 'none'}, int8/int4 {names.get(int_isa, 'none') if int_isa else 'none'}")


def emit(lines: list[str], out: str | None) -> int:
    """Print the report and write it to `out` (through a temporary file: never half-written); returns 0."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        write_atomic(out, text)
    return 0
