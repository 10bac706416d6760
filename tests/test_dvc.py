"""The real pipeline through real `dvc repro`, in a temporary copy of this checkout."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data import registry
from tests.conftest import REPO, mirror_path, needs_mirror

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration  # real `dvc repro` runs in a copy of the checkout: minutes


def sh(*args: str, cwd: Path, **extra_env: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **extra_env}
    env.pop("RNNLAB_ROOT", None)
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The checkout's files (tracked and not ignored) in a fresh git repo, with the smoke training budget."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    dest = tmp_path / "repo"
    for name in files:
        if name.split("/")[0] in ("data", "models", "reports"):
            continue  # outputs: the pipeline makes its own
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    shutil.rmtree(dest / "data", ignore_errors=True)
    (dest / "dvc.lock").unlink(missing_ok=True)
    dvc_yaml = dest / "dvc.yaml"
    text, smoked = re.subn(
        r"(python -m pipeline\.train experiment=\w+(?: [\w.=]+)*? export=true)\n",
        r"\1 budget=smoke\n",
        dvc_yaml.read_text(),
    )
    assert smoked == len(registry.sources()), "every train stage gets the smoke budget"
    dvc_yaml.write_text(text)
    sh("git", "init", "-q", cwd=dest)
    return dest


def test_dvc_repro_runs_the_pipeline_then_is_a_no_op(repo_copy):
    first = sh(str(BIN / "dvc"), "repro", "train_toy", cwd=repo_copy)
    assert "Running stage 'prepare_toy'" in first and "Running stage 'train_toy'" in first
    stats = json.loads((repo_copy / "data/prepared/toy/stats.json").read_text())
    assert (stats["train"]["n"], stats["val"]["n"], stats["test"]["n"]) == (1000, 200, 500)
    metrics = json.loads((repo_copy / "reports/metrics/toy.json").read_text())
    assert metrics["epochs"] == 2 and 0 <= metrics["test/accuracy"] <= 1
    assert (repo_copy / "mlflow.db").exists() and (repo_copy / "models/toy.keras").exists()

    second = sh(str(BIN / "dvc"), "repro", "train_toy", cwd=repo_copy)
    assert "Data and pipelines are up to date." in second
    assert "Running stage" not in second

    shown = sh(str(BIN / "dvc"), "metrics", "show", cwd=repo_copy)
    assert "test/accuracy" in shown and "linear_fraction" in shown

    # Another entry point's settings are its own config: editing them leaves training and data alone.
    for name, old, new in (
        ("bench", "steps: 100 ", "steps: 50 "),
        ("report", "include_capped: false ", "include_capped: true "),
    ):
        path = repo_copy / f"conf/{name}.yaml"
        path.write_text(path.read_text().replace(old, new))
    status = sh(str(BIN / "dvc"), "status", "train_toy", cwd=repo_copy)
    assert "up to date" in status and "changed" not in status, status

    # A model config change re-runs training only: prepare's deps did not change.
    lstm = repo_copy / "conf/model/lstm.yaml"
    lstm.write_text(lstm.read_text().replace("units: 64 ", "units: 32 "))
    third = sh(str(BIN / "dvc"), "repro", "train_toy", cwd=repo_copy)
    assert "Running stage 'train_toy'" in third and "Running stage 'prepare_toy'" not in third


def test_a_run_changes_no_tracked_file_but_dvc_lock(repo_copy):
    """A fresh clone's pipeline and report write only git-ignored outputs: no tracked file is deleted or changed
    (dvc.lock only, here because the copy trains at the smoke budget)."""
    for name in ("reports/.gitignore", "data/prepared/toy/.gitignore", "data/prepared/toy/stats.json"):
        (repo_copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo_copy / name)
    sh("git", "add", "-A", cwd=repo_copy)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone", cwd=repo_copy)
    sh(str(BIN / "dvc"), "repro", "train_toy", cwd=repo_copy)
    sh(str(BIN / "python"), "-m", "pipeline.report", cwd=repo_copy)
    assert (repo_copy / "reports/README.md").exists() and (repo_copy / "models/toy.keras").exists()
    status = sh("git", "status", "--porcelain", "--untracked-files=all", cwd=repo_copy).splitlines()
    assert [line for line in status if not line.endswith("dvc.lock")] == [], status


@needs_mirror
def test_the_whole_default_pipeline_on_the_real_data_then_a_no_op(repo_copy):
    """`make run`'s `dvc repro`, every stage on the real datasets, with the smoke training budget (the full budget
    takes 7-12 minutes here: `make run`)."""
    mirror = {"RNNLAB_DATA_MIRROR": str(mirror_path())}
    first = sh(str(BIN / "dvc"), "repro", cwd=repo_copy, **mirror)
    for name in (spec.source for spec in registry.specs() if spec.download is not None):
        assert f"Running stage 'download_{name}'" in first and f"Running stage 'prepare_{name}'" in first
    stats = json.loads((repo_copy / "data/prepared/ptb/stats.json").read_text())
    assert stats["train"]["tokens"] == 929_589  # downloaded from the mirror and prepared
    for name in registry.sources():
        assert f"Running stage 'train_{name}'" in first
        metrics = json.loads((repo_copy / f"reports/metrics/{name}.json").read_text())
        assert metrics["epochs"] == 2, name
        assert (repo_copy / f"models/{name}.keras").exists()
    assert json.loads((repo_copy / "reports/metrics/ptb.json").read_text())["test/perplexity"] > 1
    assert "Running stage 'report'" in first and (repo_copy / "reports/README.md").exists()
    assert "report up to date" not in first
    lock = (repo_copy / "dvc.lock").read_text()
    second = sh(str(BIN / "dvc"), "repro", cwd=repo_copy, **mirror)
    # Only the report looks (it reads the MLflow store, which DVC cannot see), and finds nothing new.
    assert re.findall(r"Running stage '(\w+)'", second) == ["report"], second
    assert "report up to date: the same 0 finished runs" in second  # smoke runs are capped: none reported
    assert (repo_copy / "dvc.lock").read_text() == lock


def test_dvc_push_and_pull_round_trip_through_a_remote(repo_copy, tmp_path):
    """A lab's DVC remote (here a local folder; S3 and friends work the same way): push, then pull in a fresh clone."""
    dvc = str(BIN / "dvc")
    remote = tmp_path / "dvc-remote"
    sh(dvc, "remote", "add", "--default", "team", str(remote), cwd=repo_copy)
    sh(dvc, "repro", "train_toy", cwd=repo_copy)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    sh("git", "add", "-A", cwd=repo_copy)
    sh(*git, "commit", "-qm", "pipeline run", cwd=repo_copy)
    pushed = sh(dvc, "push", cwd=repo_copy)
    assert "pushed" in pushed and any(remote.rglob("*"))

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo_copy), str(clone), cwd=tmp_path)
    assert not (clone / "models/toy.keras").exists()
    sh(dvc, "pull", "--with-deps", "train_toy", cwd=clone)
    for name in ("data/prepared/toy/train.npz", "data/prepared/toy/test.npz", "models/toy.keras"):
        assert (clone / name).read_bytes() == (repo_copy / name).read_bytes(), name
    assert "up to date" in sh(dvc, "status", "train_toy", cwd=clone)
