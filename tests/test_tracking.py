"""The tracking store: a store that cannot work fails at once with one message naming it and the fix."""

import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import prepare, tracking, train
from tests.conftest import REPO

SMALL = ("data.n_train=64", "data.n_val=32", "data.n_test=32", "model.units=8", "budget=smoke")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


def check(make_cfg, uri):
    cfg = make_cfg(f"tracking.uri={uri}")
    with pytest.raises(tracking.TrackingError) as caught:
        tracking.connect(cfg.tracking)
    return str(caught.value)


def test_a_relative_sqlite_path_is_refused_not_created_in_the_working_directory(make_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = check(make_cfg, "sqlite:///relative/mlflow.db")
    assert "is relative" in message and "sqlite:////" in message
    assert not list(tmp_path.glob("**/*.db")) and not (tmp_path / "mlruns").exists()


def test_a_store_in_a_missing_folder_is_refused(make_cfg, tmp_path):
    message = check(make_cfg, f"sqlite:///{tmp_path}/nowhere/mlflow.db")
    assert f"{tmp_path}/nowhere does not exist" in message and not (tmp_path / "nowhere").exists()


def test_a_garbage_store_is_refused_and_left_alone(make_cfg, tmp_path):
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"this is not a database\n" * 10)
    message = check(make_cfg, f"sqlite:///{store}")
    assert "not an SQLite database" in message
    assert store.read_bytes() == b"this is not a database\n" * 10


def test_a_read_only_store_is_refused(make_cfg, tmp_path):
    """A read-only file system (root ignores file modes, so a read-only bind mount is the real case)."""
    source, mount = tmp_path / "store", tmp_path / "ro"
    source.mkdir()
    mount.mkdir()
    tracking.setup_experiment(make_cfg(f"tracking.uri=sqlite:///{source}/mlflow.db").tracking)
    if subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(mount)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root): no read-only file system to test with")
    try:
        message = check(make_cfg, f"sqlite:///{mount}/mlflow.db")
        assert "read-only" in message
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("uri", ["file://{root}/mlruns", "{root}/mlruns", "mlruns"])
def test_a_file_store_is_refused_with_the_sqlite_form(make_cfg, tmp_path, monkeypatch, uri):
    """MLflow's file store raises "in maintenance mode" from deep inside a run: say at once what to use instead."""
    monkeypatch.chdir(tmp_path)
    message = check(make_cfg, uri.format(root=tmp_path))
    assert "file store" in message and f"tracking.uri=sqlite:///{tmp_path}/mlflow.db" in message
    assert not (tmp_path / "mlruns").exists()


def test_a_closed_port_fails_in_seconds_naming_the_server(make_cfg):
    started = time.monotonic()
    message = check(make_cfg, f"http://user:hunter2@127.0.0.1:{closed_port()}")
    assert time.monotonic() - started < 30  # not MLflow's minutes of retries (a hang, not a speed check)
    assert "user:***@127.0.0.1" in message and "hunter2" not in message and "make server" in message


@pytest.mark.integration  # a real process
@pytest.mark.parametrize(
    ("uri", "said"),
    [("http://127.0.0.1:{port}", "cannot be used: no answer"), ("file://{root}/mlruns", "needs a database store")],
)
def test_training_against_a_store_it_cannot_use_is_one_line_and_exit_1(make_cfg, tmp_path, uri, said):
    prepare.run(make_cfg(*SMALL))
    cmd = [
        sys.executable,
        "-m",
        "pipeline.train",
        f"paths.root={tmp_path}",
        *SMALL,
        "tracking.uri=" + uri.format(port=closed_port(), root=tmp_path),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output and said in output


def test_a_good_store_passes_and_the_retries_are_bounded(make_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    cfg = make_cfg("tracking.http_retries=1", "tracking.http_timeout=7")
    tracking.setup_experiment(cfg.tracking)

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert (tmp_path / "mlflow.db").exists()


def test_a_failed_run_keeps_its_error_in_mlflow(make_cfg, mlflow_store):
    prepare.run(make_cfg(*SMALL))
    cfg = make_cfg(*SMALL, "optimizer.learning_rate=1e12", "tracking.run_name=diverges")
    with pytest.raises(train.TrainingError, match="diverged"):
        train.run(cfg)
    client = tracking.connect(cfg.tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("rnnlab-toy").experiment_id])
    assert run.info.status == "FAILED"
    assert "TrainingError: " in run.data.tags["error"] and "diverged" in run.data.tags["error"]
    assert "diverged" in run.data.tags["mlflow.note.content"]


def _log_same_datasets(uri: str, experiment_id: str, folder: str, barrier, rounds: int, errors) -> None:
    """One sweep job's part of the race: a new run per round, the same dataset inputs as the other job's, at once."""
    client = MlflowClient(uri)
    for step in range(rounds):
        run = client.create_run(experiment_id)
        split = Path(folder) / f"round{step}.npz"
        barrier.wait()
        try:
            tracking.Tracker(client, run.info.run_id).log_dataset("toy", Path(folder), {split.stem: {"x": np.zeros(2)}})
        except Exception as err:  # reported to the test, which fails on any
            errors.put(repr(err))


@pytest.mark.integration
def test_parallel_jobs_logging_the_same_new_dataset_all_succeed(mlflow_store, tmp_path):
    """MLflow inserts a new dataset after checking that it is missing: two sweep jobs starting together raced to
    insert the same one and the loser's run FAILED. Both processes log the same new dataset each round, released
    together by a barrier."""
    rounds = 8
    for step in range(rounds):
        np.savez(tmp_path / f"round{step}.npz", x=np.full(3, step))
    experiment_id = MlflowClient(mlflow_store).create_experiment("race", artifact_location=(tmp_path / "a").as_uri())
    ctx = multiprocessing.get_context("spawn")
    barrier, errors = ctx.Barrier(2), ctx.Queue()
    args = (mlflow_store, experiment_id, str(tmp_path), barrier, rounds, errors)
    jobs = [ctx.Process(target=_log_same_datasets, args=args) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    assert [job.exitcode for job in jobs] == [0, 0]
    assert errors.empty(), errors.get()
    runs = MlflowClient(mlflow_store).search_runs([experiment_id])
    assert len(runs) == 2 * rounds and all(len(r.inputs.dataset_inputs) == 1 for r in runs)


def _open_new_store(uri: str, folder: str, role: str, barrier, errors) -> None:
    """One of several processes that meet a store that does not exist yet, released together: a training run (the
    store, its experiment, a run), a report reading finished runs, or a search opening its Optuna journal."""
    from omegaconf import OmegaConf

    from pipeline import sweep

    cfg = OmegaConf.create(
        {"uri": uri, "experiment": "rnnlab-race", "artifact_location": f"{folder}/a", "connect_timeout": 5}
        | {"http_retries": 1, "http_timeout": 5}
    )
    barrier.wait()
    try:
        if role == "report":
            tracking.finished_runs(uri, "rnnlab-%")
        elif role == "search":
            import optuna

            storage = sweep.open_storage(sweep.study_storage(OmegaConf.create({"storage": "auto"}), uri))
            optuna.create_study(study_name="race", storage=storage, load_if_exists=True)
        else:
            client = tracking.connect(cfg)
            run = client.create_run(tracking.setup_experiment(cfg, client))
            client.set_terminated(run.info.run_id)
    except Exception as err:  # reported to the test, which fails on any
        errors.put(f"{role}: {err!r}")


@pytest.mark.integration
def test_runs_reports_and_searches_starting_together_on_a_new_store_all_succeed(tmp_path):
    """Two terminals on a new checkout: MLflow creates a new sqlite store's tables without a lock, and the second
    process to start died with `table ... already exists`. Four processes meet the new store at once."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    roles = ["train", "train", "train", "report", "search", "search"]
    ctx = multiprocessing.get_context("spawn")
    barrier, errors = ctx.Barrier(len(roles)), ctx.Queue()
    jobs = [ctx.Process(target=_open_new_store, args=(uri, str(tmp_path), r, barrier, errors)) for r in roles]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=180)
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems and [job.exitcode for job in jobs] == [0] * len(roles), problems
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "rnnlab-race"]
    assert len(client.search_runs([experiment.experiment_id])) == 3


def test_an_untracked_code_file_makes_the_checkout_dirty_and_an_untracked_output_does_not(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    (tmp_path / "notes.md").write_text("an output or a note\n")
    assert tracking.git_state(tmp_path)[1] is False
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mgu2.yaml").write_text("cell: mgu2\n")  # a new model config the commit does not hold
    assert tracking.git_state(tmp_path)[1] is True
    (tmp_path / "conf" / "mgu2.yaml").unlink()
    (tmp_path / "my cell.py").write_text("x = 2\n")  # a name git quotes
    assert tracking.git_state(tmp_path)[1] is True


def test_a_store_a_killed_process_left_mid_write_is_rolled_back_not_refused(tmp_path):
    import sqlite3
    import subprocess
    import sys

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table a(x)")
        conn.executemany("insert into a values (?)", [("y" * 500,) for _ in range(500)])
    dies_mid_write = f"""
import os, signal, sqlite3
conn = sqlite3.connect({str(db)!r}, isolation_level=None)
conn.execute("pragma cache_size=1")  # pages spill to the file before the commit
conn.execute("begin")
conn.execute("update a set x = ?", ("z" * 500,))
conn.executemany("insert into a values (?)", [("x" * 500,) for _ in range(2000)])
os.kill(os.getpid(), signal.SIGKILL)
"""
    subprocess.run([sys.executable, "-c", dies_mid_write], check=False)
    assert (tmp_path / "mlflow.db-journal").exists()  # a hot journal: a read-only open cannot roll it back
    tracking.check_store(f"sqlite:///{db}", 5)  # no error: the write open rolls it back
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*), max(x) from a").fetchone() == (500, "y" * 500)
    assert not (tmp_path / "mlflow.db-journal").exists()
