"""Two `moeplan tune` workers at once on one study in a real PostgreSQL server.

The server is the system's own PostgreSQL (initdb, pg_ctl), started in a temporary folder on a free
loopback port and stopped at the end. PostgreSQL refuses to run as root, so as root it runs as `nobody`.
Skipped, with the reason, where the server binaries or the database driver are missing.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from runtime.plan import Plan

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = Path(__file__).resolve().parent / "data" / "desktop-rtx4070-published.yaml"
TRIALS = 12  # per worker


def _server_binaries() -> dict[str, str] | None:
    found = {}
    for name in ("initdb", "pg_ctl"):
        path = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]), None)
        if path is None:
            return None
        found[name] = path
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    try:
        import psycopg  # noqa: F401  the driver SQLAlchemy uses for postgresql:// URLs
    except ImportError:
        pytest.skip("the PostgreSQL driver is not installed (pip install 'moeplan[postgres]')")
    binaries = _server_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server here (initdb and pg_ctl not found): install the system's postgresql "
                    "package to run this test")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="moeplan-pg-"))
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root and no runuser to start PostgreSQL as another user")
        as_user = [runuser, "-u", "nobody", "--"]
        folder.chmod(0o755)
        shutil.chown(folder, "nobody")
    data, port = folder / "data", _free_port()
    try:
        subprocess.run([*as_user, binaries["initdb"], "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, binaries["pg_ctl"], "-D", str(data), "-l", str(folder / "server.log"), "-w",
                        "-o", f"-p {port} -k {folder} -h 127.0.0.1", "start"], check=True, capture_output=True,
                       timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start here: {exc}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, binaries["pg_ctl"], "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def model_dir(checkpoint) -> Path:
    return checkpoint("mixtral")[0]


def _tune(model_dir: Path, url: str, out: Path, trials: int, seed: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "planner.cli", "tune", "--model", str(model_dir), "--profile", str(PUBLISHED),
         "--out", str(out), "--trials", str(trials), "--seed", str(seed), "--storage", url, "--study", "shared",
         "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_workers_share_one_study(postgres_url, model_dir, tmp_path) -> None:
    import optuna

    outs = [tmp_path / f"worker{i}.yaml" for i in range(2)]
    # The same --seed: it also seeds the synthetic trace, which is part of the study's workload.
    workers = [_tune(model_dir, postgres_url, out, TRIALS, 0) for out in outs]
    finished = []
    for proc in workers:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        finished.append(proc)

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    # Every trial recorded once: 2 x TRIALS trials, numbered 0 .. 2 x TRIALS - 1, all complete.
    assert sorted(t.number for t in trials) == list(range(2 * TRIALS))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert all("choice" in t.user_attrs for t in trials)

    # The plan of the study's best: a run with no new trial chooses over everything the two workers found.
    final = tmp_path / "final.yaml"
    proc = _tune(model_dir, postgres_url, final, 0, 0)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    best = Plan.load(final)
    assert best.provenance["trials"] == 2 * TRIALS
    # The worker that read the study last saw every trial (by then both workers' trial loops had
    # ended), so it wrote the study's best too. Which worker that was is a race: the later file
    # is not necessarily the later read, so pick the plan by the trials it saw.
    plans = [Plan.load(out) for out in outs]
    written = max(plans, key=lambda plan: plan.provenance["trials"])
    assert written.provenance["trials"] == 2 * TRIALS
    # the plan itself, not the notes beside it (provenance holds the worker's own seed and date)
    assert replace(written, provenance=None) == replace(best, provenance=None)


def test_a_url_without_its_driver_is_one_line() -> None:
    from planner.tune.study import open_storage
    from runtime.errors import UserError

    with pytest.raises(UserError, match=r"^--storage: no database driver for 'mysql'"):
        open_storage("mysql://user@127.0.0.1:1/none")  # no MySQL driver is a dependency
