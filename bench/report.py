"""How the benchmarks hand over their Markdown tables: printed, and written whole to --out if given."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.atomic import write_atomic  # noqa: E402


def cpu_line() -> str:
    """A results file's CPU line: the CPU model and its vector extensions as a profile records them
    (`host_facts`), and the instruction set the kernels run on this CPU (bf16/fp32 and int), so that a result
    says which kernel path it measured."""
    from planner.profile.measure import host_facts
    from runtime.kernels import cpu_flags, instruction_sets, int_instruction_set

    host, flags = host_facts(), cpu_flags()
    names = {1: "AVX2", 2: "AVX-512", 3: "AVX2 with AVX512-VNNI"}
    isa = {str(d).split(".")[1]: names[i] for d, i in instruction_sets(flags).items()}
    return (f"- CPU: {host['cpu_model']}, {', '.join(host['isa'])}; the kernels' instruction set: {isa or 'none'}, "
            f"int8/int4 {names.get(int_instruction_set(flags) or 0, 'none')}")


def emit(lines: list[str], out: str | None) -> int:
    """Print the report and write it to `out` (through a temporary file: never half-written); returns 0."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        write_atomic(out, text)
    return 0
