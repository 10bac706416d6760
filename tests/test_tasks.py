"""The tasks: the fast training path computes what Keras' fit/evaluate compute and names the batch a NaN came from;
the language model's TBPTT windows on a hand-checked stream, its perplexity, samples and logged vocabulary."""

import contextlib
import math
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import data, prepare, tasks, train

SMALL = ("data.n_train=96", "data.n_val=32", "data.n_test=32", "trainer.batch_size=16")


@pytest.fixture
def toy_task(make_cfg):
    """A toy classification task built from real prepared data, for any trainer overrides."""
    prepare.run(make_cfg(*SMALL))

    def make(*overrides: str) -> tasks.Task:
        cfg = make_cfg(*SMALL, *overrides)
        keras.utils.set_random_seed(cfg.seed)
        return tasks.make(cfg, data.load(cfg.paths.data, cfg.data.name))

    return make


def test_a_task_without_its_model_still_gives_the_data_and_settings(make_cfg, toy_task):
    built = toy_task()
    cfg = make_cfg(*SMALL)
    bare = tasks.make(cfg, data.load(cfg.paths.data, cfg.data.name), build=False)
    assert bare.model is None and built.model is not None
    assert (bare.batch_size, bare.precision, bare.kernels) == (built.batch_size, built.precision, built.kernels)
    for a, b in zip(bare.train_arrays(0), built.train_arrays(0), strict=True):
        np.testing.assert_array_equal(a, b)


# --- The fast path (steps_per_execution) against Keras ------------------------------------------------------------
def test_evaluation_matches_keras_evaluate(toy_task):
    task = toy_task("trainer.steps_per_execution=4")
    ours = task.evaluate("val")
    x, y = task.eval_arrays("val")
    keras_logs = task.model.evaluate(x, y, batch_size=task.batch_size, verbose=0, return_dict=True)
    assert ours["val/loss"] == pytest.approx(keras_logs["loss"], rel=1e-5)
    assert ours["val/accuracy"] == pytest.approx(keras_logs["accuracy"])


def test_an_epoch_matches_keras_fit_whatever_the_steps_per_call(toy_task):
    # 96 samples in batches of 16 = 6 steps: 4 per call leaves a short last call, which must still run its 2 steps.
    weights = {}
    for per_call in (1, 4):
        task = toy_task(f"trainer.steps_per_execution={per_call}")
        metrics = task.train_epoch(0)
        weights[per_call] = task.model.get_weights()
        assert 0 <= metrics["train/accuracy"] <= 1 and np.isfinite(metrics["train/loss"])
    reference = toy_task("trainer.steps_per_execution=1")
    x, y = reference.train_arrays(0)
    history = reference.model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0).history
    for a, b, c in zip(weights[1], weights[4], reference.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
    assert metrics["train/loss"] == pytest.approx(history["loss"][-1], rel=1e-4)


def test_a_nan_names_the_single_batch_when_one_step_runs_per_call(toy_task):
    task = toy_task("trainer.steps_per_execution=1")
    x, y = task.train_arrays(0)
    x = x.copy()
    x[40, 0, 0] = np.nan  # batch 3 of 16
    with pytest.raises(tasks.TrainingError, match=r"loss became nan at epoch 1, batch 3: "):
        task.run_batches(True, x, y)


def test_a_nan_names_the_batches_of_its_call(toy_task):
    # 90 samples in batches of 16, 4 per call: calls of batches 1-4, 5 and the short batch 6.
    task = toy_task("trainer.steps_per_execution=4")
    x, y = task.train_arrays(0)
    task.run_batches(True, x[:16], y[:16])  # one step: the optimizer's variables exist, to be restored below
    start = [np.array(v) for v in task.model.variables + task.model.optimizer.variables]
    for row, where in ((70, "batch 5"), (85, "batch 6"), (20, "batches 1-4")):
        for variable, value in zip(task.model.variables + task.model.optimizer.variables, start, strict=True):
            variable.assign(value)  # the weights as before the NaN of the previous case
        bad = x[:90].copy()
        bad[row, 0, 0] = np.nan
        with pytest.raises(tasks.TrainingError, match=rf"loss became nan at epoch 1, {where}: "):
            task.run_batches(True, bad, y[:90])


def test_check_finite_names_every_bad_metric():
    tasks.check_finite({"train/loss": 3.0, "val/perplexity": 12.0}, "epoch 1")
    with pytest.raises(tasks.TrainingError, match=r"val/loss=nan, val/perplexity=inf at epoch 2"):
        tasks.check_finite({"train/loss": 3.0, "val/loss": math.nan, "val/perplexity": math.inf}, "epoch 2")


# --- The language model ----------------------------------------------------------------------------------------
# The TF tutorial's reader_test: 15 tokens, 3 streams, windows of 2.
RAW = [4, 3, 2, 1, 0, 5, 6, 1, 1, 1, 1, 0, 3, 4, 1]


def test_windows_match_the_hand_computed_batches():
    x, y = tasks.lm_windows(np.array(RAW), batch_size=3, steps=2)
    # streams: [4 3 2 1 0], [5 6 1 1 1], [1 0 3 4 1]; (5 - 1) // 2 = 2 windows
    np.testing.assert_array_equal(x[:3], [[4, 3], [5, 6], [1, 0]])
    np.testing.assert_array_equal(y[:3], [[3, 2], [6, 1], [0, 3]])
    np.testing.assert_array_equal(x[3:], [[2, 1], [1, 1], [3, 4]])
    np.testing.assert_array_equal(y[3:], [[1, 0], [1, 1], [4, 1]])
    with pytest.raises(ValueError, match="too few"):
        tasks.lm_windows(np.arange(5), batch_size=3, steps=2)


def test_language_model_training_logs_perplexity_samples_and_a_vocabulary(trained_lm, tmp_path):
    root, result = trained_lm  # trained with bfloat16 output gradients (conftest)
    history = result["history"]
    assert [h["val/perplexity"] for h in history] == sorted(h["val/perplexity"] for h in history)[::-1]  # falls
    assert history[-1]["val/perplexity"] < 1.5  # the stream is periodic: near-certain predictions
    for h in history:
        assert h["train/perplexity"] == pytest.approx(math.exp(h["train/loss"]))
    assert [h["train/learning_rate"] for h in history] == [1.0, 0.5, 0.25]  # held 1 epoch, then halved
    assert history[-1]["perf/tokens_per_sec"] > 0
    m = result["metrics"]
    assert m["test/perplexity"] == pytest.approx(math.exp(m["test/loss"]))

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    run_id = result["run_id"]
    assert client.get_run(run_id).data.tags["precision"] == "bfloat16_grad"
    assert client.get_run(run_id).data.tags["kernels"] == "fused, the LSTM layers as one wavefront"  # two layers
    names = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert names == {f"samples/epoch_{e:03d}.txt" for e in (1, 2, 3)}
    assert {a.path for a in client.list_artifacts(run_id)} >= {"vocab.txt", "config.yaml"}
    text = client.download_artifacts(run_id, "samples/epoch_003.txt", str(tmp_path))
    lines = Path(text).read_text().splitlines()
    assert lines[0].startswith("greedy: the company said") and lines[1].startswith("sample: the company said")
    assert lines[0].split()[4:11] == ["w0", "w1", "w2", "<eos>", "the", "company", "said"]  # the learnt period
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")  # the model URI is resolved in the current store
    try:
        logged = mlflow.keras.load_model(result["model_uri"])
    finally:
        mlflow.set_tracking_uri(previous)
    assert type(logged.get_layer("logits")) is keras.layers.Dense  # bfloat16 gradients are a training detail


def test_a_float32_language_model_learns_the_stream_too_layer_by_layer(tiny_ptb, tmp_path):
    cfg = tiny_ptb(
        "trainer.precision=float32", "trainer.epochs=2", "tracking.log_model=false", "trainer.wavefront=false"
    )
    result = train.run(cfg)
    assert result["history"][-1]["val/perplexity"] < 1.5  # the periodic stream is learnt either way
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(result["run_id"])
    assert run.data.tags["precision"] == "float32"
    assert run.data.tags["kernels"] == "fused"  # the two layers one after another


def test_a_diverged_language_model_fails_instead_of_finishing(tiny_ptb, tmp_path):
    """lr 1e12: the loss grows without bound; an infinite perplexity (or the guard) stops the run, FAILED."""
    for guard in ("trainer.divergence_factor=null", "trainer.divergence_factor=10"):
        cfg = tiny_ptb("optimizer.learning_rate=1e12", "optimizer.clip_global_norm=null", guard, "trainer.epochs=2")
        with pytest.raises(train.TrainingError, match=r"diverged|loss became"):
            train.run(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("rnnlab-ptb").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED", "FAILED"]
    assert all("diverged" in r.data.tags["error"] or "loss became" in r.data.tags["error"] for r in runs)


def test_a_tensorflow_warning_is_printed_once_through_the_root_handler(capsys):
    import logging

    root, tf_logger = logging.getLogger(), logging.getLogger("tensorflow")
    own, mine = logging.StreamHandler(), logging.StreamHandler()  # TensorFlow's own, as at its import; Hydra's
    own.setFormatter(logging.Formatter("TF %(message)s"))
    mine.setFormatter(logging.Formatter("ROOT %(message)s"))
    tf_logger.addHandler(own)
    root.addHandler(mine)
    try:
        tasks.one_log_handler()
        tf_logger.warning("triggered tf.function retracing")
    finally:
        root.removeHandler(mine)
        tf_logger.removeHandler(own)
    assert capsys.readouterr().err.splitlines().count("ROOT triggered tf.function retracing") == 1
    assert own not in tf_logger.handlers


def test_a_stop_during_a_call_into_the_compiled_step_waits_for_the_call_to_return(toy_task):
    from pipeline import tracking

    task, interrupts, calls = toy_task("trainer.steps_per_execution=2"), tracking.Interrupts(), []

    @contextlib.contextmanager
    def held():
        with interrupts.held():
            calls.append(len(calls))
            if len(calls) == 2:
                assert interrupts.note(15) is False  # SIGTERM in the second call: held
            yield

    task.hold = held
    x, y = task.train_arrays(0)
    with pytest.raises(KeyboardInterrupt, match="stopped after a span"):
        task.run_batches(True, x, y)
    assert calls == [0, 1]  # the second call returned, then the stop: no third call
