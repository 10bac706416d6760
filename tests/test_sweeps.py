"""Hydra multirun -> one MLflow parent run with a child per job, sequential and with the parallel launcher."""

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from pipeline import prepare
from tests.conftest import REPO

SMALL = ("data.n_train=64", "data.n_val=32", "data.n_test=32", "model.units=8", "tracking.log_model=false")


def multirun(tmp_path, *args):
    env = {**os.environ}
    env.pop("RNNLAB_ROOT", None)
    env.pop("RNNLAB_SWEEP_PARENT_RUN_ID", None)
    cmd = [
        sys.executable,
        "-m",
        "pipeline.train",
        "-m",
        f"paths.root={tmp_path}",
        "trainer=smoke",
        "trainer.verbose=0",
        *SMALL,
        *args,
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def sweep_runs(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("rnnlab-toy")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep_role") != "parent"]
    return client, parents, children


@pytest.mark.parametrize("launcher", ["basic", "parallel"])
def test_two_by_two_sweep_is_one_parent_with_four_children(make_cfg, tmp_path, launcher):
    prepare.run(make_cfg(*SMALL))
    extra = ["hydra/launcher=parallel"] if launcher == "parallel" else []
    multirun(tmp_path, "model=rnn,gru", "optimizer=adam,rmsprop", "tracking.sweep_name=grid", *extra)
    client, parents, children = sweep_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "grid"
    assert parent.data.params["model"] == "rnn,gru" and parent.data.params["optimizer"] == "adam,rmsprop"
    assert parent.data.metrics["sweep/children"] == 4 and parent.data.metrics["sweep/finished"] == 4
    combos = set()
    for child in children:
        tags = child.data.tags
        assert child.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["sweep"] == "grid" and tags["dataset"] == "toy" and tags["cell"] in ("rnn", "gru")
        combos.add((tags["cell"], child.data.params["optimizer.name"]))
        # Nothing lost to concurrent writers: every epoch of every metric arrived.
        for key in ("train/loss", "val/loss", "val/accuracy"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == [0, 1]
        assert "test/accuracy" in child.data.metrics
        threads = child.data.params["trainer.intra_op_threads"]
        assert threads == ("1" if launcher == "parallel" else "0")
    assert combos == {(c, o) for c in ("rnn", "gru") for o in ("adam", "rmsprop")}
