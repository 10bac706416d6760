"""The cell registry: a cell added from outside the project trains through ``pipeline.train`` like the built-in ones."""

import math

import keras
import pytest
from mlflow.tracking import MlflowClient

from pipeline import cells, compare, config, models, prepare, train
from tests.conftest import model_cfg

SMALL_DATA = ("data.n_train=128", "data.n_val=32", "data.n_test=64")
PLAIN = cells.Cell("plain_rnn", "Plain RNN", keras.layers.SimpleRNNCell, gates=1)  # SimpleRNN's cell, no fused kernel


@pytest.fixture
def plain_cell():
    with cells.registered(PLAIN) as cell:
        yield cell


def run_of(uri: str, result: dict):
    return MlflowClient(tracking_uri=uri).get_run(result["run_id"])


def test_a_registered_cell_trains_a_classifier_as_its_built_in_twin(plain_cell, make_cfg, mlflow_store):
    """SimpleRNN's cell under a new name, run by keras.layers.RNN: the same seed gives the built-in SimpleRNN's
    numbers (same weights, same math), and the run records the new name."""
    prepare.run(make_cfg(*SMALL_DATA))
    results = {
        cell: train.run(make_cfg(*SMALL_DATA, "budget=smoke", "model=rnn", f"model.cell={cell}", "model.units=16"))
        for cell in ("rnn", "plain_rnn")
    }
    run = run_of(mlflow_store, results["plain_rnn"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.cell"] == "plain_rnn" and run.data.tags["cell"] == "plain_rnn"
    assert run.data.tags["kernels"] == "keras"
    ours, twin = (results[c]["metrics"] for c in ("plain_rnn", "rnn"))
    assert ours["test/accuracy"] == pytest.approx(twin["test/accuracy"], abs=1e-6)
    assert ours["val/loss"] == pytest.approx(twin["val/loss"], rel=1e-4)


def test_a_registered_cell_without_a_fused_kernel_trains_a_language_model_on_keras_loop(
    plain_cell, tiny_ptb, mlflow_store
):
    """The fused language-model path (``trainer.kernels=fused``) runs Keras' loop for a cell with no fused kernel,
    and the run's ``kernels`` tag says so."""
    result = train.run(tiny_ptb("model.cell=plain_rnn", "trainer.kernels=fused", "trainer.generate_words=0"))
    run = run_of(mlflow_store, result)
    assert run.info.status == "FINISHED"
    assert run.data.tags["kernels"] == "fused, Keras' loop for plain_rnn (it has no fused kernel)"
    ppl = result["metrics"]["val/perplexity"]
    assert math.isfinite(ppl) and ppl < 7  # a periodic stream of 7 words: learning beats uniform guessing


def test_the_cell_is_checked_when_the_config_is_validated(plain_cell, make_cfg):
    config.validate(make_cfg("model.cell=plain_rnn"))
    with pytest.raises(config.ConfigError, match=r"unknown cell type 'plian_rnn'; choose one of .*plain_rnn"):
        config.validate(make_cfg("model.cell=plian_rnn"))
    cells.unregister("plain_rnn")
    with pytest.raises(config.ConfigError, match="unknown cell type 'plain_rnn'"):
        config.validate(make_cfg("model.cell=plain_rnn"))


def test_bidirectional_and_stacking_wrap_a_registered_cell(plain_cell):
    meta = {"name": "toy", "kind": "classification", "input": "dense", "features": 1, "num_classes": 2}
    model = models.build_classifier(model_cfg(cell="plain_rnn", bidirectional=True, layers=2, units=4), meta)
    layers = [model.get_layer(f"bi_plain_rnn_{i}") for i in (1, 2)]
    assert all(isinstance(layer.forward_layer.cell, keras.layers.SimpleRNNCell) for layer in layers)
    assert compare.cells.display("biplain_rnn") == "BiPlain RNN" and cells.display("lstm") == "LSTM"


class BareCell(keras.layers.Layer):
    """A minimal user cell: no recurrent dropout, no initialiser arguments."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = self.state_size = self.output_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1] + self.units, self.units))

    def call(self, inputs, states):
        h = keras.ops.tanh(keras.ops.matmul(keras.ops.concatenate([inputs, states[0]], axis=-1), self.kernel))
        return h, [h]


def test_a_cell_is_given_only_the_settings_it_takes_and_refuses_the_rest():
    meta = {"name": "toy", "kind": "classification", "input": "dense", "features": 1, "num_classes": 2}
    with cells.registered(cells.Cell("bare", "Bare", BareCell, gates=1)):
        model = models.build_classifier(model_cfg(cell="bare", units=3), meta)
        assert model.count_params() == (1 + 3) * 3 + 3 * 2 + 2
        with pytest.raises(cells.CellError, match=r"cell 'bare' \(BareCell\) takes no recurrent_dropout"):
            models.build_classifier(model_cfg(cell="bare", units=3, recurrent_dropout=0.1), meta)


def test_unknown_and_unloadable_cells_say_what_to_do():
    with pytest.raises(cells.CellError, match="unknown cell type 'lstn'; valid cell types: rnn, lstm, gru, cifg"):
        cells.get("lstn")
    broken = cells.Cell("broken", "Broken", "keras.layers.NoSuchCell", gates=1)
    with pytest.raises(cells.CellError, match="cell 'broken': cannot load 'keras.layers.NoSuchCell'"):
        broken.keras_class()
    with pytest.raises(cells.CellError, match="already registered"):
        cells.register(cells.Cell("lstm", "LSTM", "keras.layers.LSTM", gates=4))
    assert cells.names()[:3] == ("rnn", "lstm", "gru")
