"""The package structure DESIGN's layout asks for, checked on the source: import direction, no import
cycle, no private name imported from another module, and torch-free contracts.

Imports are read with `ast` from every module of `planner/` and `runtime/`, at any depth (an import
inside a function or under TYPE_CHECKING still ties two modules together).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("planner", "runtime")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement in the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [alias.name for alias in node.names]))
    return found


def resolve(target: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """The project modules an import statement loads: `from pkg import mod` names the submodule."""
    out = []
    if target in known:
        out.append(target)
    out += [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        deps = set()
        for target, names in imports(name, path):
            deps.update(resolve(target, names, known))
        edges[name] = deps - {name}
    return edges


def test_runtime_never_imports_planner():
    offenders = [f"{m} imports {d}" for m, deps in graph().items() if m.startswith("runtime")
                 for d in deps if d.startswith("planner")]
    assert not offenders, offenders


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if dep.startswith(node + "."):
                continue  # a package's __init__ re-exporting its own submodules is not a cycle
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_no_private_name_is_imported_from_another_module():
    known = modules()
    offenders = []
    for name, path in known.items():
        for target, names in imports(name, path):
            if target.split(".")[0] not in PACKAGES:
                continue
            offenders += [f"{name} imports {n} from {target}" for n in names if n.startswith("_")]
    assert not offenders, "\n".join(offenders)


def test_contracts_and_the_cost_model_import_without_torch():
    code = ("import sys, runtime.contracts.traces, runtime.contracts.cache_policy, runtime.contracts.model_shape, "
            "runtime.contracts.memory, runtime.contracts.fields, runtime.plan, planner.cost_model, "
            "planner.tune.evaluation, planner.routing.workload; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
