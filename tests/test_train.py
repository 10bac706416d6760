"""A real (tiny) training run into a temporary sqlite MLflow store, checked through MLflow's own API."""

import json
import os

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import config, data, prepare, train

SMALL_DATA = ("data.n_train=128", "data.n_val=32", "data.n_test=64")


@pytest.fixture
def smoke(make_cfg, mlflow_store):
    """An empty store and a small toy dataset prepared; returns a function that trains with the smoke budget."""
    prepare.run(make_cfg(*SMALL_DATA))

    def run(*overrides):
        return train.run(make_cfg(*SMALL_DATA, "budget=smoke", *overrides))

    return run


COMMON_PARAMS = {
    "data.name", "data.source", "data.kind", "data.min_len", "data.max_len", "data.max_value", "data.n_train",
    "data.n_val", "data.n_test", "data.pad_value", "data.seed",
    "model.cell", "model.bidirectional", "model.layers", "model.units", "model.dropout", "model.recurrent_dropout",
    "model.unroll", "model.embedding_dim", "model.init_scale", "model.param_budget",
    "optimizer.name", "optimizer.learning_rate", "optimizer.clip_global_norm", "optimizer.lr_decay",
    "optimizer.lr_decay_start",
    "trainer.epochs", "trainer.batch_size", "trainer.bptt_steps", "trainer.max_steps_per_epoch",
    "trainer.max_eval_batches", "trainer.early_stopping_patience", "trainer.deterministic", "trainer.jit_compile",
    "trainer.precision", "trainer.steps_per_execution", "trainer.distribute",
    "seed", "precision",
}  # fmt: skip
ADAM_PARAMS = {"optimizer.beta_1", "optimizer.beta_2", "optimizer.epsilon"}


def test_smoke_run_is_tracked_completely(smoke, tmp_path, monkeypatch):
    """Run from another working directory: every file lands under paths.root, none where the command ran."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = smoke("model=gru", "tracking.run_name=smoke-gru", "export=true")
    assert os.listdir(elsewhere) == []
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "smoke-gru"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "rnnlab-toy"
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()  # never under the cwd

    params = run.data.params
    assert set(params) == COMMON_PARAMS | ADAM_PARAMS  # what determines the result: no paths, stores, switches
    assert params["model.cell"] == "gru" and params["model.units"] == "64"
    assert params["optimizer.name"] == "adam" and params["trainer.epochs"] == "2"
    assert params["data.n_train"] == "128" and params["seed"] == "42"

    tags = run.data.tags
    assert tags["dataset"] == "toy" and tags["cell"] == "gru" and tags["seed"] == "42"
    assert len(tags["data_digest"]) == 64 and tags["git_commit"]

    for key in ("train/loss", "train/accuracy", "val/loss", "val/accuracy", "perf/samples_per_sec"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0, 1], key
        assert all(np.isfinite(m.value) for m in history)
    assert 0.0 <= run.data.metrics["test/accuracy"] <= 1.0
    assert run.data.metrics["test/loss"] > 0

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    logged_config = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    assert "cell: gru" in logged_config

    # The logged model reloads and predicts exactly what the trained one does.
    x = np.load(tmp_path / "data/prepared/toy/test.npz")["x"][:16]
    loaded = mlflow.keras.load_model(result["model_uri"])
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(result["model"](x)), atol=1e-6)
    signature = mlflow.models.get_model_info(result["model_uri"]).signature
    assert tuple(signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 20, 1)
    assert signature.outputs.to_dict()[0]["tensor-spec"] == {"dtype": "float32", "shape": (-1, 2)}

    report = json.loads((tmp_path / "reports/metrics/toy.json").read_text())
    assert report["test/accuracy"] == pytest.approx(run.data.metrics["test/accuracy"])
    assert report["epochs"] == 2
    assert (tmp_path / "models/toy.keras").exists()


def test_a_run_logs_only_its_own_optimizers_keys(smoke, tmp_path):
    """An SGD run logs its momentum and none of Adam's keys (the smoke run above is Adam's)."""
    result = smoke("optimizer=sgd", "trainer.checkpoint=false", "tracking.log_model=false")
    params = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(result["run_id"]).data.params
    assert set(params) == COMMON_PARAMS | {"optimizer.momentum"}


def test_same_seed_same_numbers(smoke):
    first = smoke("tracking.enabled=false")["metrics"]
    # trainer.distribute=true is a no-op without several GPUs: the very same numbers.
    second = smoke("tracking.enabled=false", "trainer.distribute=true")["metrics"]
    assert first == second
    other = smoke("tracking.enabled=false", "seed=7")["metrics"]
    assert other["train/loss"] != first["train/loss"]


def test_nan_loss_stops_with_a_clear_error_and_a_failed_run(smoke, tmp_path):
    # Corrupt one training value: the loss turns NaN on the first batch that holds it.
    dataset = data.load(tmp_path / "data", "toy")  # a NaN in the data as prepared (its checksums recorded)
    dataset.splits["train"]["x"][5, 0, 0] = np.nan
    data.save(tmp_path / "data/prepared/toy", dataset)
    with pytest.raises(
        train.TrainingError, match=r"loss became nan at epoch 1, batch(es)? [\d-]+: .*check the data for NaNs"
    ):
        smoke()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("rnnlab-toy").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.slow
def test_default_toy_lstm_reaches_the_seed_accuracy(make_cfg):
    prepare.run(make_cfg())
    result = train.run(make_cfg("experiment=toy_dynamic", "tracking.log_model=false"))
    assert result["metrics"]["test/accuracy"] >= 0.95


def test_data_overrides_at_train_time_must_match_the_prepared_data(smoke, tmp_path):
    """Training reads the prepared arrays: a data.* value they were not built with is refused, not logged."""
    with pytest.raises(config.ConfigError, match=r"data\.n_train=64 \(prepared with 128\).*pipeline\.prepare data=toy"):
        smoke("data.n_train=64")
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()]
    )


@pytest.mark.integration  # sizing builds a dozen models before training
def test_a_param_budget_sizes_the_units_and_the_run_records_them(smoke, tmp_path):
    result = smoke("model=gru", "model.param_budget=5000", "tracking.log_model=false")
    count = result["model"].count_params()
    assert abs(count - 5000) <= 0.02 * 5000  # the GRU nearest 5,000 parameters
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(result["run_id"])
    assert run.data.params["model.param_budget"] == "5000" and run.data.tags["params_count"] == str(count)
    assert int(run.data.params["model.units"]) == result["model"].get_layer("gru_1").units


def test_config_id_is_the_configuration_without_its_seed(make_cfg):
    def cid(*overrides, digest="d1", precision="float32"):
        return config.config_id(make_cfg(*overrides), digest, precision)

    assert cid("seed=1") == cid("seed=2") == cid("seed=3", "trainer.verbose=2")  # runtime keys do not count
    assert len({cid(), cid("optimizer.learning_rate=0.1"), cid(digest="d2"), cid(precision="bfloat16_grad")}) == 4
    assert cid() != config.fingerprint(make_cfg())  # the resume fingerprint keeps the seed


def test_a_sigterm_that_tensorflow_turns_into_an_error_of_its_own_still_ends_the_run_killed(
    smoke, monkeypatch, tmp_path
):
    """A signal handler's KeyboardInterrupt raised inside one of TensorFlow's context managers comes out as
    TensorFlow's RuntimeError (seen in CI): the run is still KILLED and resumable, not FAILED."""
    from pipeline import tasks, tracking

    made = []

    class Recorded(tracking.Interrupts):
        def __init__(self):
            super().__init__()
            made.append(self)

    def fit_epoch(self, epoch):
        made[0].note(15)  # the SIGTERM handler ran ...
        raise RuntimeError("Exiting device scope without proper scope nesting")  # ... and TensorFlow re-raised

    monkeypatch.setattr(tracking, "Interrupts", Recorded)
    monkeypatch.setattr(tasks.Task, "fit_epoch", fit_epoch)
    with pytest.raises(train.Interrupted) as caught:
        smoke()
    assert caught.value.signum == 15 and caught.value.epochs_done == 0
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(caught.value.run_id).info.status == "KILLED"


def test_a_run_connects_once_reads_its_data_once_and_computes_its_config_id_once(smoke, monkeypatch):
    """Real functions, counted: one store probe, one read of each prepared file, one config_id per run."""
    from pipeline.tracking import runs

    calls = {"probe": 0, "config_id": 0}
    reads: list[str] = []
    check_store, read_verified, config_id = runs.check_store, data.read_verified, config.config_id

    def probe(uri, timeout):
        calls["probe"] += 1
        return check_store(uri, timeout)

    def read(folder, file, sums, name):
        reads.append(file)
        return read_verified(folder, file, sums, name)

    def count_id(*args):
        calls["config_id"] += 1
        return config_id(*args)

    monkeypatch.setattr(runs, "check_store", probe)
    monkeypatch.setattr(data, "read_verified", read)
    monkeypatch.setattr(config, "config_id", count_id)
    result = smoke("model.param_budget=3000")  # sizing to a budget reads the data's meta too
    assert result["metrics"]["test/accuracy"] >= 0
    assert calls == {"probe": 1, "config_id": 1}
    assert sorted(reads) == sorted(set(reads)) and "meta.json" in reads  # every file once
