"""The PTB language model: TBPTT batching on a hand-checked stream, state carry-over, perplexity, presets."""

import math
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import models, tasks, train
from pipeline.data import Dataset, save
from tests.test_models import model_cfg

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


META = {"name": "tiny", "kind": "language_model", "input": "tokens", "vocab_size": 20}


def lm_cfg(**kw):
    return model_cfg(**{"layers": 2, "init_scale": 0.5, **kw})


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_state_is_carried_from_one_window_to_the_next(cell):
    keras.utils.set_random_seed(0)
    model = models.build_language_model(lm_cfg(cell=cell), META, batch_size=1)
    w1, w2 = np.array([[1, 2, 3, 4]]), np.array([[5, 6, 7, 8]])
    model(w1, training=False)
    carried = np.asarray(model(w2, training=False))
    models.reset_states(model)
    fresh = np.asarray(model(w2, training=False))
    assert not np.allclose(carried, fresh, atol=1e-4), "window 2 ignored the state left by window 1"
    # A reset state is a zero state: the stateless export model agrees with it.
    stateless = models.build_language_model(lm_cfg(cell=cell), META)
    stateless.set_weights(model.get_weights())
    np.testing.assert_allclose(np.asarray(stateless(w2, training=False)), fresh, atol=1e-5)
    # ... and reading both windows at once equals reading them one after the other with the state carried.
    np.testing.assert_allclose(np.asarray(stateless(np.hstack([w1, w2])))[:, 4:], carried, atol=1e-5)


def test_language_model_cannot_be_bidirectional():
    with pytest.raises(ValueError, match="bidirectional=false"):
        models.build_language_model(lm_cfg(bidirectional=True), META)


def test_sequence_loss_is_the_per_token_loss_times_the_steps():
    y = np.array([[1, 2, 3]])
    logits = np.random.default_rng(0).normal(size=(1, 3, 20)).astype("float32")
    per_token = float(np.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)))
    assert float(models.SequenceLoss(3)(y, logits)) == pytest.approx(3 * per_token, rel=1e-6)


@pytest.fixture
def tiny_ptb(make_cfg, tmp_path):
    """A prepared 'ptb' whose vocabulary and streams are small enough to train in a second."""
    vocab = ["<eos>", "the", "company", "said", "<unk>", *[f"w{i}" for i in range(15)]]
    # A repetitive stream: learnable, so perplexity must fall.
    stream = np.tile(np.array([1, 2, 3, 5, 6, 7, 0]), 300)
    splits = {s: {"ids": stream[:n].astype(np.int32)} for s, n in (("train", 2100), ("val", 700), ("test", 700))}
    meta = {**META, "name": "ptb", "eos_id": 0, "unk_id": 4}
    save(tmp_path / "data/prepared/ptb", Dataset(splits=splits, meta=meta, stats={}, vocab=vocab))

    def cfg(*overrides):
        return make_cfg(
            "+experiment=ptb_small",
            "model.units=32",
            "model.init_scale=0.5",
            "trainer.batch_size=4",
            "trainer.bptt_steps=5",
            "trainer.epochs=3",
            "optimizer.lr_decay_start=1",
            *overrides,
        )

    return cfg


def test_language_model_training_logs_perplexity_samples_and_a_vocabulary(tiny_ptb, tmp_path):
    result = train.run(tiny_ptb())
    history = result["history"]
    assert [h["val/perplexity"] for h in history] == sorted(h["val/perplexity"] for h in history)[::-1]  # falls
    assert history[-1]["val/perplexity"] < 1.5  # the stream is periodic: near-certain predictions
    for h in history:
        assert h["train/perplexity"] == pytest.approx(math.exp(h["train/loss"]))
    assert [h["train/learning_rate"] for h in history] == [1.0, 0.5, 0.25]  # held 1 epoch, then halved
    assert history[-1]["perf/tokens_per_sec"] > 0
    m = result["metrics"]
    assert m["test/perplexity"] == pytest.approx(math.exp(m["test/loss"]))

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run_id = result["run_id"]
    names = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert names == {f"samples/epoch_{e:03d}.txt" for e in (1, 2, 3)}
    assert {a.path for a in client.list_artifacts(run_id)} >= {"vocab.txt", "config.yaml"}
    text = client.download_artifacts(run_id, "samples/epoch_003.txt", str(tmp_path))
    lines = Path(text).read_text().splitlines()
    assert lines[0].startswith("greedy: the company said") and lines[1].startswith("sample: the company said")
    assert lines[0].split()[4:11] == ["w0", "w1", "w2", "<eos>", "the", "company", "said"]  # the learnt period


@pytest.mark.parametrize("precision", ["float32", "bfloat16_grad"])
def test_both_language_model_precisions_learn_and_log_a_plain_keras_model(tiny_ptb, tmp_path, precision):
    result = train.run(tiny_ptb(f"trainer.precision={precision}", "trainer.epochs=2"))
    assert result["history"][-1]["val/perplexity"] < 2.0  # the periodic stream is learnt either way
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(result["run_id"])
    assert run.data.tags["precision"] == precision
    logged = mlflow.keras.load_model(result["model_uri"])
    assert type(logged.get_layer("logits")) is keras.layers.Dense  # bfloat16 gradients are a training detail


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


def test_check_finite_names_every_bad_metric():
    tasks.check_finite({"train/loss": 3.0, "val/perplexity": 12.0}, "epoch 1")
    with pytest.raises(tasks.TrainingError, match=r"val/loss=nan, val/perplexity=inf at epoch 2"):
        tasks.check_finite({"train/loss": 3.0, "val/loss": math.nan, "val/perplexity": math.inf}, "epoch 2")
