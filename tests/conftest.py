from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_factory import build_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A function family -> (folder, config), building each family's random checkpoint once per session."""
    built: dict[str, tuple[Path, object]] = {}

    def get(family: str):
        if family not in built:
            folder = tmp_path_factory.mktemp(f"ckpt-{family}")
            built[family] = (folder, build_checkpoint(family, folder, seed=len(built)))
        return built[family]

    return get
