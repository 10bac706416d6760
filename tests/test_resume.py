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

from pipeline import config, data, prepare, tracking, train
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
QUICK = ("trainer.max_steps_per_epoch=3", "trainer.max_eval_batches=2")  # in-process runs: a few steps suffice


def train_process(tmp_path, *overrides):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RNNLAB_ROOT", None)
    cmd = [sys.executable, "-m", "pipeline.train", f"paths.root={tmp_path}", "trainer.verbose=0", *COMMON, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def runs(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("rnnlab-toy")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.integration  # a real process
def test_killed_run_resumes_to_the_same_result(make_cfg, tmp_path):
    """Started as the DVC stage starts it (export=true, its own store and mirror settings), continued from a plain
    shell without them: the fingerprint holds only what determines the result, so the shell finds the run."""
    prepare.run(make_cfg(*COMMON))
    proc = train_process(tmp_path, "export=true", "trainer.intra_op_threads=1", "trainer.generate_words=3")
    state = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        states = list((tmp_path / "checkpoints").glob("*/state.json"))
        if states:
            state = states[0]
            break
        time.sleep(0.02)
    assert state is not None, f"no checkpoint appeared:\n{proc.communicate()[0]}"
    proc.send_signal(signal.SIGTERM)  # mid-epoch 2 (or later): epoch 1 is checkpointed
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    client, (killed,) = runs(tmp_path)
    assert killed.info.status == "KILLED", output[-3000:]
    # One line, no traceback, with the command that continues the run.
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert re.search(
        rf"interrupted \(SIGTERM\): run {killed.info.run_id} is KILLED, its checkpoint after epoch \d is kept\. "
        rf"Continue it with: python -m pipeline\.train paths\.root=\S+ .*trainer\.resume_run_id={killed.info.run_id}",
        output,
    ), output[-3000:]
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


@pytest.mark.integration  # a real process
def test_resuming_a_run_that_a_live_process_trains_is_refused(make_cfg, tmp_path):
    """It used to attach to the live run and crash; now the live process keeps it, untouched."""
    prepare.run(make_cfg(*COMMON))
    proc = train_process(tmp_path, "trainer.epochs=100")
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list((tmp_path / "checkpoints").glob("*/state.json")):
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.05)
        (state,) = (tmp_path / "checkpoints").glob("*/state.json")
        run_id = state.parent.name
        busy = rf"run {run_id} is being trained right now \(pid {proc.pid} on .*\): it is busy, not interrupted"
        with pytest.raises(train.TrainingError, match=busy):
            train.run(make_cfg(*COMMON, "trainer.epochs=100", "trainer.resume=true"))
        with pytest.raises(train.TrainingError, match=busy):
            train.run(make_cfg(*COMMON, "trainer.epochs=100", f"trainer.resume_run_id={run_id}"))
        assert proc.poll() is None
        client, (run,) = runs(tmp_path)
        assert run.info.status == "RUNNING"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    client, (run,) = runs(tmp_path)
    assert run.info.status == "KILLED" and proc.returncode == 128 + signal.SIGTERM


def test_a_finished_run_is_never_resumed(make_cfg, tmp_path, mlflow_store):
    """Named, it is refused and left as it was; with trainer.resume=true, a finished run does not count: the run
    starts afresh."""
    prepare.run(make_cfg(*COMMON))
    done = train.run(make_cfg(*COMMON, *QUICK, "trainer.epochs=1"))
    client, _ = runs(tmp_path)
    before = client.get_run(done["run_id"])
    with pytest.raises(train.TrainingError, match=rf"run {done['run_id']} is FINISHED: it is complete"):
        train.run(make_cfg(*COMMON, *QUICK, "trainer.epochs=1", f"trainer.resume_run_id={done['run_id']}"))
    after = client.get_run(done["run_id"])
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.metrics == before.data.metrics
    with pytest.raises(tracking.TrackingError, match="no MLflow run 0123abcd in sqlite:///"):
        train.run(make_cfg(*COMMON, *QUICK, "trainer.resume_run_id=0123abcd"))

    again = train.run(make_cfg(*COMMON, *QUICK, "trainer.epochs=1", "trainer.resume=true"))
    assert again["run_id"] != done["run_id"] and again["metrics"]["epochs"] == 1
    fresh = client.get_run(again["run_id"])
    assert fresh.info.status == "FINISHED" and "resumed_at_epoch" not in fresh.data.tags


def test_a_run_whose_process_died_before_a_checkpoint_never_stays_running(make_cfg, tmp_path, mlflow_store):
    """kill -9 before the first checkpoint leaves a run RUNNING with nothing to resume. Named, the resume is refused
    and the run ends KILLED; found by trainer.resume=true, a new run trains the config and the old one ends KILLED,
    naming its replacement."""
    prepare.run(make_cfg(*COMMON))
    overrides = (*COMMON, *QUICK, "trainer.epochs=1")
    cfg = config.validate(make_cfg(*overrides))
    client = tracking.connect(cfg.tracking)
    experiment = tracking.setup_experiment(cfg.tracking, client)

    def orphan() -> str:  # what a process killed with -9 between starting its run and its first epoch leaves
        return client.create_run(experiment, tags={"config_hash": config.fingerprint(cfg)}).info.run_id

    named = orphan()
    with pytest.raises(train.TrainingError, match=rf"run {named} \(RUNNING\) has no complete checkpoint"):
        train.run(make_cfg(*overrides, f"trainer.resume_run_id={named}"))
    assert client.get_run(named).info.status == "KILLED"
    assert "kill -9" in client.get_run(named).data.tags["mlflow.note.content"]

    found = orphan()
    done = train.run(make_cfg(*overrides, "trainer.resume=true"))
    old, new = client.get_run(found), client.get_run(done["run_id"])
    assert done["run_id"] != found and new.info.status == "FINISHED"
    assert old.info.status == "KILLED" and old.data.tags["superseded_by"] == new.info.run_id
    assert new.data.tags["supersedes"] == found
    assert [r.info.status for r in client.search_runs([experiment])].count("RUNNING") == 0


@pytest.mark.integration  # a real process
def test_nan_loss_in_a_real_process_fails_the_run_with_a_message(make_cfg, tmp_path):
    prepare.run(make_cfg(*COMMON))
    dataset = data.load(tmp_path / "data", "toy")  # a NaN in the data as prepared (its checksums recorded)
    dataset.splits["train"]["x"][:, 0, 0] = np.nan
    data.save(tmp_path / "data/prepared/toy", dataset)
    proc = train_process(tmp_path)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 1
    assert re.search(r"loss became nan at epoch 1, batch(es 1-\d+| 1):", output) and "check the data for NaNs" in output
    _, (run,) = runs(tmp_path)
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_during_a_store_write_takes_effect_after_it_and_a_second_one_at_once(signum):
    interrupts = tracking.Interrupts()
    written = []
    with pytest.raises(KeyboardInterrupt, match="stopped after a span it waited for"), interrupts.held():
        assert interrupts.note(signum) is False  # not now: the write would be cut in half
        written.append("metrics")
    assert written == ["metrics"] and interrupts.requested and interrupts.signal == signum
    assert interrupts.note(signum) is True  # outside a write: at once
    with pytest.raises(KeyboardInterrupt), interrupts.held():
        assert interrupts.note(signum) is False and interrupts.note(signum) is True  # pressed twice: a hung store


def test_a_signal_the_process_was_started_to_ignore_stays_ignored():
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with train.sigterm_as_interrupt(tracking.Interrupts()):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_ctrl_c_and_a_closed_terminal_stop_training_as_sigterm_does(signum):
    before = signal.getsignal(signum)
    if before is signal.SIG_IGN:
        pytest.skip("this test process was started to ignore it (nohup)")
    interrupts = tracking.Interrupts()
    with pytest.raises(KeyboardInterrupt), train.sigterm_as_interrupt(interrupts):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises here, at the next bytecode
    assert interrupts.signal == signum and signal.getsignal(signum) == before
    name = train.interrupted_message(train.Interrupted(None, 0, signum))
    assert name.startswith("interrupted (Ctrl-C)" if signum == signal.SIGINT else "interrupted (SIGHUP)")


def test_a_run_is_resumed_only_with_the_settings_seed_and_data_it_started_with(make_cfg, tmp_path, mlflow_store):
    """Another learning rate, seed or prepared data would leave a record that contradicts itself: refused before
    the run is touched, naming what differs."""
    prepare.run(make_cfg(*COMMON))
    overrides = (*COMMON, *QUICK, "trainer.epochs=1")
    started = config.validate(make_cfg(*overrides, "optimizer.learning_rate=0.002", "seed=7"))
    client = tracking.connect(started.tracking)
    experiment = tracking.setup_experiment(started.tracking, client)
    run_id = client.create_run(experiment, tags={"config_hash": config.fingerprint(started)}).info.run_id
    for key, value in tracking.flatten(config.result_config(started)).items():
        client.log_param(run_id, key, value)
    client.set_terminated(run_id, "KILLED")
    differ = r"started with other settings: optimizer.learning_rate=0.002 \(now 0.001\), seed=7 \(now 42\)"
    with pytest.raises(config.ConfigError, match=differ):
        train.run(make_cfg(*overrides, f"trainer.resume_run_id={run_id}"))
    client.set_tag(run_id, "data_digest", "0" * 64)
    with pytest.raises(config.ConfigError, match="trained on other prepared data"):
        train.run(make_cfg(*overrides, "optimizer.learning_rate=0.002", "seed=7", f"trainer.resume_run_id={run_id}"))
    assert client.get_run(run_id).info.status == "KILLED"
    client.set_tag(run_id, "config_hash", config.fingerprint(config.validate(make_cfg(*overrides))))
    done = train.run(make_cfg(*overrides, "trainer.resume=true"))  # found, on other data: a new run, not an error
    assert done["run_id"] != run_id and client.get_run(run_id).info.status == "KILLED"
    older = client.create_run(experiment, tags={"config_hash": "from an older rnnlab"}).info.run_id
    same = config.validate(make_cfg(*overrides))
    for key, value in tracking.flatten(config.result_config(same)).items():
        if key != "trainer.steps_per_execution":  # a key newer than the run: it ran with the default
            client.log_param(older, key, value)
    with pytest.raises(train.TrainingError, match=rf"run {older} \(RUNNING\) has no complete checkpoint"):
        train.run(make_cfg(*overrides, f"trainer.resume_run_id={older}"))  # past the settings check


def test_a_resumed_run_keeps_the_tags_it_started_with_and_records_what_changed():
    first = {"git_commit": "aaa", "git_dirty": "False", "seed": "7"}
    now = {"git_commit": "bbb", "git_dirty": False, "seed": 7, "kernels": "fused"}
    assert tracking.resumed_tags(first, now) == {"kernels": "fused", "resumed.git_commit": "bbb"}


def test_a_run_the_store_failed_to_mark_is_not_said_to_be_killed(monkeypatch):
    monkeypatch.setattr(train, "resume_command", lambda run_id: f"resume {run_id}")
    said = train.interrupted_message(train.Interrupted("abc", 2, signal.SIGINT, unmarked=True))
    assert said.startswith("interrupted (Ctrl-C): run abc could not be marked KILLED") and "is KILLED" not in said
    assert "run abc is KILLED" in train.interrupted_message(train.Interrupted("abc", 2, signal.SIGTERM))
