"""The checkout stands alone: its tracked files, copied to a folder with nothing beside it, tune and explain.

Nothing the project needs may live outside it (a trace in a sibling folder, a machine path): the copy
runs `moeplan tune --model mixtral` on a shipped profile, which needs the recorded OLMoE trace that the
synthetic routing is fitted to, and `moeplan explain` of the plan it wrote.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# An absolute folder of a machine: a user's home, the root account's, this workplace's checkouts, scratch under /tmp.
MACHINE_PATH = re.compile(r"(/home/[a-z]|/tmp/[A-Za-z]|/root/|/work/|/Users/[A-Za-z]|\.\./shared/(?!checks/))")


def tracked_files() -> list[str]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("alone") / "moeplan"
    for name in tracked_files():
        dst = folder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dst)
    assert not (folder.parent / "shared").exists()
    return folder


def moeplan(clone: Path, *args: str) -> subprocess.CompletedProcess:
    # `-m planner.cli` from the copy's root imports the copy's packages, not the installed checkout's
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], cwd=clone, capture_output=True, text=True,
                          timeout=600)


def test_the_copy_imports_itself(clone):
    done = subprocess.run([sys.executable, "-c", "import planner, runtime; print(planner.__file__, runtime.__file__)"],
                          cwd=clone, capture_output=True, text=True, check=True)
    assert all(Path(p).is_relative_to(clone) for p in done.stdout.split())


def test_tune_and_explain_in_a_fresh_copy(clone):
    tuned = moeplan(clone, "tune", "--model", "mixtral", "--profile", "profiles/rtx4070.yaml", "--trials", "20",
                    "--out", "plans/fresh.yaml", "--no-progress")
    assert tuned.returncode == 0, tuned.stderr
    assert "synthetic" in tuned.stderr and "olmoe-1b-7b-decode-299.jsonl" in tuned.stderr
    explained = moeplan(clone, "explain", "plans/fresh.yaml", "--profile", "profiles/rtx4070.yaml")
    assert explained.returncode == 0, explained.stderr
    assert "decode" in explained.stdout
    plan_text = (clone / "plans/fresh.yaml").read_text()
    assert not MACHINE_PATH.search(plan_text), plan_text


def test_no_tracked_file_names_a_machine_path():
    offenders = []
    for name in tracked_files():
        if name.startswith("tests/test_fresh_clone.py"):
            continue  # this file spells the pattern out
        try:
            text = (ROOT / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary: weights, a compiled file
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                offenders.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not offenders, "\n".join(offenders)
