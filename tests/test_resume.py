"""Interrupt and resume for real: a training subprocess killed mid-epoch, then continued to the same result."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import prepare, tracking, train
from tests.conftest import REPO

COMMON = (
    "data.n_train=600",
    "data.n_val=64",
    "data.n_test=64",
    "model.units=16",
    "model.dropout=0.2",
    "trainer.epochs=4",
    "trainer.batch_size=4",
    "tracking.log_model=false",
)


def train_process(tmp_path, *overrides):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RNNLAB_ROOT", None)
    cmd = [sys.executable, "-m", "pipeline.train", f"paths.root={tmp_path}", "trainer.verbose=0", *COMMON, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def runs(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("rnnlab-toy")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_killed_run_resumes_to_the_same_result(make_cfg, tmp_path):
    prepare.run(make_cfg(*COMMON))
    proc = train_process(tmp_path)
    state = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        states = list((tmp_path / "checkpoints").glob("*/state.json"))
        if states:
            state = states[0]
            break
        time.sleep(0.02)
    assert state is not None, f"no checkpoint appeared:\n{proc.communicate()[0]}"
    proc.send_signal(signal.SIGTERM)  # mid-epoch 2: epoch 1 is checkpointed
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, output
    client, (killed,) = runs(tmp_path)
    assert killed.info.status == "KILLED", output[-3000:]
    done = json.loads(state.read_text())["epochs_done"]
    assert 1 <= done < 4 and state.parent.name == killed.info.run_id

    resumed = train.run(make_cfg(*COMMON, "trainer.resume=true"))
    assert resumed["run_id"] == killed.info.run_id
    client, all_runs = runs(tmp_path)
    assert [r.info.status for r in all_runs] == ["FINISHED"]
    steps = [m.step for m in client.get_metric_history(killed.info.run_id, "train/loss")]
    assert sorted(steps) == [0, 1, 2, 3]
    assert not state.parent.exists()  # a finished run needs its checkpoint no more

    uninterrupted = train.run(make_cfg(*COMMON))
    for key, value in uninterrupted["metrics"].items():
        assert resumed["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    for a, b in zip(resumed["history"], uninterrupted["history"], strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6)


def test_resume_without_an_unfinished_run_starts_afresh(make_cfg):
    prepare.run(make_cfg(*COMMON))
    result = train.run(make_cfg(*COMMON, "trainer.epochs=1", "trainer.resume=true"))
    assert result["metrics"]["epochs"] == 1


def test_nan_loss_in_a_real_process_fails_the_run_with_a_message(make_cfg, tmp_path):
    prepare.run(make_cfg(*COMMON))
    path = tmp_path / "data/prepared/toy/train.npz"
    arrays = dict(np.load(path))
    arrays["x"][:, 0, 0] = np.nan
    np.savez(path, **arrays)
    proc = train_process(tmp_path)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 1
    assert re.search(r"loss became nan at epoch 1, batch(es 1-\d+| 1):", output) and "check the data for NaNs" in output
    _, (run,) = runs(tmp_path)
    assert run.info.status == "FAILED"


def test_a_sigterm_during_a_store_write_takes_effect_after_it(monkeypatch):
    monkeypatch.setattr(tracking, "_interrupted", False)
    written = []

    @tracking._store_write
    def write():
        assert tracking.note_interrupt() is False  # not now: the write would be cut in half
        written.append("metrics")

    with pytest.raises(KeyboardInterrupt, match="SIGTERM during a store write"):
        write()
    assert written == ["metrics"] and tracking._interrupted
    assert tracking.note_interrupt() is True  # outside a write: at once
