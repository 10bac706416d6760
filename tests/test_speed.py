"""The fast training path: it computes what Keras' fit/evaluate compute, and the speed settings keep the model."""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import config, data, models, prepare, tasks
from tests.test_lm import META as LM_META
from tests.test_lm import lm_cfg
from tests.test_models import META, model_cfg, padded

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


@pytest.mark.parametrize("precision", ["bfloat16_output", "mixed_bfloat16"])
def test_reduced_precision_keeps_float32_outputs_and_float32_weights(precision):
    keras.utils.set_random_seed(0)
    lm = models.build_language_model(lm_cfg(), LM_META, batch_size=2, precision=precision)
    logits = lm(np.array([[1, 2, 3], [4, 5, 6]]))
    assert logits.dtype == "float32" and logits.shape == (2, 3, 20)
    assert all(w.dtype == "float32" for w in lm.weights)
    assert lm.get_layer("logits").compute_dtype == "bfloat16"
    classifier = models.build_classifier(model_cfg(), META, precision=precision)
    probs = np.asarray(classifier(padded([0.1, 0.2], 4)))
    assert probs.dtype == np.float32 and probs.sum() == pytest.approx(1.0, abs=1e-6)


def test_float32_lm_and_reduced_precision_agree_closely():
    keras.utils.set_random_seed(0)
    full = models.build_language_model(lm_cfg(), LM_META)
    half = models.build_language_model(lm_cfg(), LM_META, precision="bfloat16_output")
    half.set_weights(full.get_weights())  # same layers, same weights: only the output layer's arithmetic differs
    tokens = np.array([[1, 2, 3, 4, 5, 6]])
    np.testing.assert_allclose(half(tokens), full(tokens), atol=0.05)


def test_bfloat16_grad_matmul_is_float32_forward_and_bfloat16_backward():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(8, 16)), tf.float32)
    w = tf.constant(rng.normal(size=(16, 32)), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, w])
        fast = models.matmul_bfloat16_grad(x, w)
        exact = tf.matmul(x, w)
        weights = tf.constant(rng.normal(size=(8, 32)), tf.float32)
        fast_loss, exact_loss = tf.reduce_sum(fast * weights), tf.reduce_sum(exact * weights)
    np.testing.assert_array_equal(fast, exact)  # the forward pass (logits, loss) is untouched float32
    for ours, reference in zip(tape.gradient(fast_loss, [x, w]), tape.gradient(exact_loss, [x, w]), strict=True):
        assert ours.dtype == tf.float32
        np.testing.assert_allclose(ours, reference, rtol=0.02, atol=0.05)  # bfloat16: 8 significant bits
        assert not np.array_equal(ours, reference)  # it really ran in bfloat16


def test_bfloat16_grad_lm_trains_like_float32_and_exports_plain_keras(tmp_path):
    keras.utils.set_random_seed(0)
    tokens, targets = np.array([[1, 2, 3, 4], [5, 6, 7, 8]]), np.array([[2, 3, 4, 5], [6, 7, 8, 9]])
    trained = {}
    for precision in ("float32", "bfloat16_grad"):
        lm = models.build_language_model(lm_cfg(), LM_META, batch_size=2, precision=precision)
        if trained:
            lm.set_weights(trained["float32"][0])  # same weights, same layout
        lm.compile(optimizer=keras.optimizers.SGD(1.0), loss=models.SequenceLoss(4))
        start = lm.get_weights()
        lm.train_on_batch(tokens, targets)
        trained[precision] = (start, lm.get_weights(), lm)
    lm = trained["bfloat16_grad"][2]
    assert isinstance(lm.get_layer("logits"), models.Bfloat16GradDense)
    start = trained["float32"][0]
    for before, a, b in zip(start, trained["float32"][1], trained["bfloat16_grad"][1], strict=True):
        np.testing.assert_allclose(b, a, atol=2e-3)
        assert np.abs(b - before).max() > 0.01 or np.abs(a - before).max() < 0.01  # every weight learns
    lm.save(tmp_path / "checkpoint.keras")  # a checkpoint reloads with the layer, for resuming
    reloaded = keras.models.load_model(tmp_path / "checkpoint.keras")
    assert isinstance(reloaded.get_layer("logits"), models.Bfloat16GradDense)
    exported = models.build_language_model(lm_cfg(), LM_META, precision="bfloat16_grad")
    assert type(exported.get_layer("logits")) is keras.layers.Dense  # the logged model needs no rnnlab code
    exported.set_weights(lm.get_weights())
    models.reset_states(lm)
    np.testing.assert_allclose(exported(tokens), lm(tokens), rtol=1e-5, atol=1e-5)


def test_auto_precision_follows_the_machine(monkeypatch):
    monkeypatch.setattr(models, "gpu_available", lambda: False)
    monkeypatch.setattr(models, "cpu_bf16_matmul", lambda: "avx512_bf16")
    assert models.resolve_precision("auto") == "bfloat16_grad"
    assert models.resolve_precision("auto", "classification") == "float32"
    assert models.resolve_precision("mixed_bfloat16", "classification") == "mixed_bfloat16"
    monkeypatch.setattr(models, "cpu_bf16_matmul", lambda: None)
    assert models.resolve_precision("auto") == "float32"
    assert models.resolve_precision("mixed_float16") == "mixed_float16"
    monkeypatch.setattr(models, "cpu_bf16_matmul", lambda: "amx_bf16")
    monkeypatch.setattr(models, "gpu_available", lambda: True)
    assert models.resolve_precision("auto") == "float32"


def test_cpu_bf16_flags_are_read_from_cpuinfo():
    flags = Path("/proc/cpuinfo").read_text().split()
    expected = "amx_bf16" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None
    assert models.cpu_bf16_matmul() == expected


def test_unrolled_layers_compute_the_same_function():
    keras.utils.set_random_seed(0)
    rolled = models.build_language_model(lm_cfg(), LM_META)
    unrolled = models.build_language_model(lm_cfg(unroll=True), LM_META)
    assert unrolled.get_layer("lstm_1").unroll and not rolled.get_layer("lstm_1").unroll
    unrolled.set_weights(rolled.get_weights())
    tokens = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_allclose(unrolled(tokens), rolled(tokens), atol=1e-5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.precision=half", "trainer.precision: unknown precision 'half'"),
        ("trainer.steps_per_execution=0", "trainer.steps_per_execution: must be at least 1"),
        ("trainer.jit_compile=true", "also set trainer.deterministic=false"),
    ],
)
def test_speed_settings_are_validated(make_cfg, override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.validate(make_cfg(override))


@pytest.mark.parametrize(("row", "where"), [(70, "batch 5"), (85, "batch 6"), (20, "batches 1-4")])
def test_a_nan_names_the_batches_of_its_call(toy_task, row, where):
    # 90 samples in batches of 16, 4 per call: calls of batches 1-4, 5 and the short batch 6.
    task = toy_task("trainer.steps_per_execution=4")
    x, y = task.train_arrays(0)
    x, y = x[:90].copy(), y[:90]
    x[row, 0, 0] = np.nan
    with pytest.raises(tasks.TrainingError, match=rf"loss became nan at epoch 1, {where}: "):
        task.run_batches(True, x, y)
