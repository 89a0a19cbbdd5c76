"""Where the project's own data lives: everything the planner reads by default is inside the checkout."""
from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TRACES = PROJECT_ROOT / "traces"  # recorded routing traces, each with its source and license (traces/README.md)
PROFILES = PROJECT_ROOT / "profiles"
PLANS = PROJECT_ROOT / "plans"


def shown(path: Path) -> str:
    """`path` as a user should read it in logs and provenance: relative to the project when inside it, so
    that no machine's folder is written into a plan."""
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)
