"""Checkpoints and model files under crashes and full disks: a real killed process, a real 5 MB filesystem."""

import datetime
import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.saving import saving_lib
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline import checkpoint, models, prepare, train
from pipeline.checkpoint import (
    Checkpoint,
    CheckpointError,
    DiskFullError,
    rng_states,
    save_model_atomic,
)
from tests.conftest import REPO


def tiny_model(vocab: int = 50, seed: int = 0) -> tuple[keras.Model, tuple[np.ndarray, np.ndarray]]:
    """Embedding + LSTM(4) + dropout + Dense, compiled with Adam and trained one step (so the optimizer has state)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(vocab, 32),
            keras.layers.LSTM(4),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(vocab),
        ]
    )
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(seed)
    batch = rng.integers(0, vocab, (8, 6)).astype("int32"), rng.integers(0, vocab, (8,)).astype("int32")
    model.train_on_batch(*batch)
    return model, batch


def weights(model: keras.Model) -> list[np.ndarray]:
    return [np.array(w) for w in model.get_weights()]


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_roundtrip_restores_weights_optimizer_and_rng_exactly(tmp_path):
    model, batch = tiny_model()
    ckpt = Checkpoint(tmp_path / "run")
    assert not ckpt.exists()
    ckpt.save(model, 0, [{"train/loss": 1.5}])
    assert ckpt.exists() and ckpt.folder == tmp_path / "run"
    state = json.loads(ckpt.state_path.read_text())
    assert state["epochs_done"] == 1 and files(ckpt.folder) == sorted(["state.json", state["model"]])

    loaded, done, history = ckpt.load()
    assert done == 1 and history == [{"train/loss": 1.5}]
    assert_same(weights(loaded), weights(model))
    assert_same([np.array(v) for v in loaded.optimizer.variables], [np.array(v) for v in model.optimizer.variables])
    assert int(loaded.optimizer.iterations) == 1
    assert rng_states(model) and len(rng_states(loaded)) == len(rng_states(model))
    assert_same([np.array(v) for v in rng_states(loaded)], [np.array(v) for v in rng_states(model)])
    # The proof that all of it came back: one more step (with dropout) moves both models alike.
    model.train_on_batch(*batch)
    loaded.train_on_batch(*batch)
    assert_same(weights(loaded), weights(model))

    ckpt.save(model, 1, [{"train/loss": 1.5}, {"train/loss": 1.4}])  # replaces epoch 1: one model file, not two
    state = json.loads(ckpt.state_path.read_text())
    assert state["epochs_done"] == 2 and files(ckpt.folder) == sorted(["state.json", state["model"]])
    assert_same(weights(ckpt.load()[0]), weights(model))


CRASH = """
import os, signal, sys, json
from pathlib import Path
import numpy as np
from {module} import Checkpoint
from tests.test_checkpoint import tiny_model
out = sys.argv[1]
model, batch = tiny_model()
ckpt = Checkpoint(Path(out) / "run")
ckpt.save(model, 0, [{{"loss": 1.0}}])
np.savez(os.path.join(out, "epoch1.npz"), *model.get_weights())
model.train_on_batch(*batch)
dumps = json.dumps
def die_on_state(obj, *args, **kwargs):  # the process dies as the state of epoch 2 is written, after its model
    if isinstance(obj, dict) and obj.get("epochs_done") == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return dumps(obj, *args, **kwargs)
json.dumps = die_on_state
ckpt.save(model, 1, [{{"loss": 1.0}}, {{"loss": 0.9}}])
"""


def crash_between_model_and_state(tmp_path, module: str = "pipeline.checkpoint") -> None:
    script = CRASH.format(module=module)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


@pytest.mark.integration  # a real process
def test_a_crash_between_model_and_state_leaves_the_previous_checkpoint(tmp_path):
    crash_between_model_and_state(tmp_path)
    ckpt = Checkpoint(tmp_path / "run")
    assert len(list(ckpt.folder.glob("model-*.keras"))) == 2  # the crash left epoch 2's model, never committed
    assert ckpt.exists()
    model, done, history = ckpt.load()
    assert done == 1 and history == [{"loss": 1.0}]
    epoch1 = np.load(tmp_path / "epoch1.npz")
    assert_same(weights(model), [epoch1[f"arr_{i}"] for i in range(len(epoch1.files))])  # epoch 1's, not epoch 2's

    ckpt.save(model, 1, [{"loss": 1.0}, {"loss": 0.9}])  # the next save cleans up what the crash left
    assert files(ckpt.folder) == sorted(["state.json", json.loads(ckpt.state_path.read_text())["model"]])


def fail_state_write(monkeypatch, code: int) -> None:
    """The state write fails with ``code`` after the model file is written."""
    dumps = json.dumps

    def failing(obj, *args, **kwargs):
        if isinstance(obj, dict) and "epochs_done" in obj:
            raise OSError(code, os.strerror(code))
        return dumps(obj, *args, **kwargs)

    monkeypatch.setattr(checkpoint.json, "dumps", failing)


def test_a_failed_state_write_leaves_nothing_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, batch = tiny_model()
    first = Checkpoint(tmp_path / "first")
    with monkeypatch.context() as m:
        fail_state_write(m, errno.EIO)
        with pytest.raises(CheckpointError, match="there is no earlier checkpoint") as info:
            first.save(model, 0, [])
    assert not isinstance(info.value, DiskFullError) and "Input/output error" in str(info.value)
    assert not first.exists() and files(first.folder) == []

    ckpt = Checkpoint(tmp_path / "run")
    ckpt.save(model, 0, [{"loss": 1.0}])
    before, epoch1 = files(ckpt.folder), weights(model)
    model.train_on_batch(*batch)
    with monkeypatch.context() as m:
        fail_state_write(m, errno.ENOSPC)
        with pytest.raises(DiskFullError) as info:
            ckpt.save(model, 1, [{"loss": 1.0}, {"loss": 0.9}])
    assert "previous checkpoint (epoch 1) is intact" in str(info.value)
    assert files(ckpt.folder) == before
    loaded, done, _ = ckpt.load()
    assert done == 1
    assert_same(weights(loaded), epoch1)


def test_a_checkpoint_from_before_the_manifest_still_loads(tmp_path):
    model, _ = tiny_model()
    folder = tmp_path / "run"
    folder.mkdir()
    model.save(folder / "model.keras")
    rng = [np.asarray(v).tolist() for v in rng_states(model)]
    (folder / "state.json").write_text(json.dumps({"epochs_done": 3, "history": [], "rng": rng}))
    ckpt = Checkpoint(folder)
    assert ckpt.exists() and ckpt.model_path == folder / "model.keras"
    loaded, done, _ = ckpt.load()
    assert done == 3
    assert_same(weights(loaded), weights(model))


def test_a_damaged_model_file_is_refused_with_a_message(tmp_path):
    model, _ = tiny_model()
    ckpt = Checkpoint(tmp_path / "run")
    ckpt.save(model, 0, [])
    data = ckpt.model_path.read_bytes()
    ckpt.model_path.write_bytes(data[:-10] + bytes(10))  # same size, other bytes
    with pytest.raises(CheckpointError, match=r"is damaged: .* delete .* and train afresh\.$") as info:
        ckpt.load()
    assert str(info.value.with_resume("abc123")) == str(info.value)  # resuming it again cannot help


@pytest.fixture
def small_disk(tmp_path):
    """A real 5 MB filesystem (tmpfs), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small filesystem")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a 5 MB tmpfs (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk, leave: int = 64 * 1024) -> None:
    """Fill the disk but for ``leave`` bytes, as other outputs would."""
    free = shutil.disk_usage(disk).free
    with open(disk / "ballast", "wb") as fh:
        fh.write(bytes(max(free - leave, 0)))


def leftovers(disk) -> list[str]:
    """Partial, hidden or temporary files anywhere on the disk."""
    return [str(p) for p in disk.rglob("*") if p.name.startswith((".", "tmp")) or "partial" in p.name]


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_what_to_do(small_disk):
    model, batch = tiny_model(vocab=2000)  # ~1 MB with the Adam slots
    ckpt = Checkpoint(small_disk / "checkpoints" / "run")
    ckpt.save(model, 0, [{"loss": 1.0}])
    before, epoch1 = files(ckpt.folder), weights(model)
    model.train_on_batch(*batch)
    fill(small_disk)
    with pytest.raises(DiskFullError) as info:
        ckpt.save(model, 1, [{"loss": 1.0}, {"loss": 0.9}])
    message = str(info.value)
    assert f"no space left on the device while writing epoch 2's checkpoint in {ckpt.folder}" in message
    assert "KB free there; a checkpoint of this model takes" in message and "(epoch 1) is intact" in message
    assert message.endswith(": free disk space.")
    assert str(info.value.with_resume("abc123")).endswith(
        ": free disk space, then continue with trainer.resume_run_id=abc123."
    )
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert str(pickle.loads(pickle.dumps(info.value))) == message  # crosses process boundaries (joblib) intact
    assert files(ckpt.folder) == before and leftovers(small_disk) == []
    loaded, done, _ = ckpt.load()
    assert done == 1
    assert_same(weights(loaded), epoch1)

    (small_disk / "ballast").unlink()  # space freed: the same save now succeeds
    ckpt.save(model, 1, [{"loss": 1.0}, {"loss": 0.9}])
    loaded, done, _ = ckpt.load()
    assert done == 2 and len(files(ckpt.folder)) == 2
    assert_same(weights(loaded), weights(model))


def test_a_full_disk_leaves_no_partial_model_file(small_disk):
    model, _ = tiny_model(vocab=2000)
    path = small_disk / "models" / "toy.keras"
    fill(small_disk)
    with pytest.raises(DiskFullError, match=rf"writing the model {path} \(.* free there\)") as info:
        save_model_atomic(model, path)
    assert "there is no file there" in str(info.value) and str(info.value).endswith("free disk space.")
    assert files(path.parent) == [] and leftovers(small_disk) == []

    (small_disk / "ballast").unlink()
    save_model_atomic(model, path)
    old = weights(model)
    other, _ = tiny_model(vocab=2000, seed=1)
    fill(small_disk)
    with pytest.raises(DiskFullError, match="the previous file is unchanged"):
        save_model_atomic(other, path)
    assert files(path.parent) == ["toy.keras"] and leftovers(small_disk) == []
    assert_same(weights(keras.models.load_model(path)), old)


def test_save_model_atomic_replaces_the_file_and_clears_stale_partials(tmp_path):
    path = tmp_path / "models" / "toy.keras"
    path.parent.mkdir()
    (path.parent / ".toy.partial-dead.keras").write_bytes(b"left by a killed run")
    first, _ = tiny_model()
    save_model_atomic(first, path)
    second, _ = tiny_model(seed=1)
    save_model_atomic(second, path)
    assert files(path.parent) == ["toy.keras"]
    assert_same(weights(keras.models.load_model(path)), weights(second))


def seeded_model() -> keras.Model:
    """The pipeline's kind of model (named layers; a bidirectional LSTM, whose halves share initializers), built and
    trained two epochs from seed 3 as a fresh process would: ``clear_session`` restarts Keras' automatic names."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(3)
    tf.config.experimental.enable_op_determinism()  # as the pipeline trains: the same numbers in every process
    cfg = dict(cell="lstm", bidirectional=True, layers=1, units=4, dropout=0.2, recurrent_dropout=0.0)
    meta = {"name": "toy", "kind": "classification", "input": "dense", "features": 1, "pad_value": -1.0}
    model = models.build_model(OmegaConf.create(cfg), {**meta, "num_classes": 2})
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(8, 5, 1)).astype("float32")
    model.fit(x, np.arange(8) % 2, epochs=2, verbose=0)
    return model


def entry_times(path) -> dict[str, tuple]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: info.date_time for info in archive.infolist()}


def test_the_same_model_saved_later_gives_the_same_bytes(tmp_path, monkeypatch):
    """Keras stamps the save time in the file (``date_saved``, the zip entries' times): the clock moves on three days
    between two saves, and the real one by more than a second (any time the HDF5 library might record)."""
    model, batch = tiny_model()
    save_model_atomic(model, tmp_path / "first.keras")
    model.save(tmp_path / "first-plain.keras")
    real_time, later = time.time, time.time() + 3 * 86400
    monkeypatch.setattr(time, "time", lambda: real_time() + 3 * 86400)  # the zip entries' clock

    class Later(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime.fromtimestamp(time.time(), tz)

    monkeypatch.setattr(saving_lib, "datetime", types.SimpleNamespace(datetime=Later))  # date_saved's clock
    time.sleep(1.1)
    save_model_atomic(model, tmp_path / "second.keras")
    model.save(tmp_path / "second-plain.keras")

    plain = keras.saving.KerasFileEditor(str(tmp_path / "second-plain.keras")).metadata["date_saved"]
    assert plain.startswith(datetime.datetime.fromtimestamp(later).strftime("%Y-%m-%d@"))  # the clock did move
    assert (tmp_path / "first-plain.keras").read_bytes() != (tmp_path / "second-plain.keras").read_bytes()
    assert (tmp_path / "first.keras").read_bytes() == (tmp_path / "second.keras").read_bytes()
    assert set(entry_times(tmp_path / "second.keras").values()) == {(1980, 1, 1, 0, 0, 0)}
    assert keras.saving.KerasFileEditor(str(tmp_path / "second.keras")).metadata == {
        "keras_version": keras.__version__,
        "date_saved": "1980-01-01@00:00:00",
    }

    model.train_on_batch(*batch)  # other weights: other bytes
    save_model_atomic(model, tmp_path / "trained.keras")
    assert (tmp_path / "trained.keras").read_bytes() != (tmp_path / "second.keras").read_bytes()
    assert_same(weights(keras.models.load_model(tmp_path / "trained.keras")), weights(model))


def test_a_reproducible_model_file_loads_and_predicts_identically(tmp_path):
    model = seeded_model()
    path = tmp_path / "models" / "toy.keras"
    save_model_atomic(model, path)
    config = zipfile.ZipFile(path).read("config.json").decode()
    shared = {int(n) for n in re.findall(r'"shared_object_id": (\d+)', config)}
    assert shared == set(range(1, 8))  # 7 shared objects (dtype policy, initializers): memory addresses renumbered
    loaded = keras.models.load_model(path)
    assert_same(weights(loaded), weights(model))
    assert_same([np.array(v) for v in loaded.optimizer.variables], [np.array(v) for v in model.optimizer.variables])
    x = np.random.default_rng(1).normal(size=(4, 7, 1)).astype("float32")
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    model.save(tmp_path / "plain.keras")  # the same model as Keras itself writes and reads it
    assert loaded.get_config() == keras.models.load_model(tmp_path / "plain.keras").get_config()


SEEDED = """
import sys
from pipeline.checkpoint import save_model_atomic
from tests.test_checkpoint import seeded_model
save_model_atomic(seeded_model(), sys.argv[1])
"""


@pytest.mark.integration  # a real process
def test_identically_seeded_models_save_identical_bytes_in_one_process_and_in_another(tmp_path):
    """Two models built and trained alike, here and in a fresh process (as each clone's `make run` does)."""
    other = tmp_path / "other.keras"
    proc = subprocess.Popen([sys.executable, "-c", SEEDED, str(other)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    for name in ("one", "two"):
        model = seeded_model()
        save_model_atomic(model, tmp_path / f"{name}.keras")
        model.save(tmp_path / f"{name}-plain.keras")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    plain = [zipfile.ZipFile(tmp_path / f"{name}-plain.keras").read("config.json") for name in ("one", "two")]
    assert plain[0] != plain[1]  # Keras writes the shared objects' memory addresses
    one = (tmp_path / "one.keras").read_bytes()
    assert one == (tmp_path / "two.keras").read_bytes() == other.read_bytes()


def test_training_onto_a_full_disk_ends_the_run_failed_with_the_reason(small_disk, make_cfg, tmp_path, mlflow_store):
    """The run's own view: the store still works, so the run ends FAILED with why, and the message says how to go on."""
    small = ("data.n_train=64", "data.n_val=32", "data.n_test=32", "budget=smoke", f"paths.checkpoints={small_disk}")
    prepare.run(make_cfg(*small))
    fill(small_disk, leave=16 * 1024)
    with pytest.raises(DiskFullError) as info:
        train.run(make_cfg(*small))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("rnnlab-toy").experiment_id])
    assert run.info.status == "FAILED" and "no space left" in run.data.tags["error"]
    assert f"then continue with trainer.resume_run_id={run.info.run_id}" in str(info.value)
    assert not leftovers(small_disk)
