"""The built-in variant cells (``pipeline/variants/``): one step of each against numbers worked out by hand, found by
name like Keras' own, sized, saved and loaded, and trained on the toy task above chance."""

import math

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline import cells, config, models, prepare, train
from tests.conftest import CONF, compose_config, model_cfg
from tests.test_compare import METAS

VARIANTS = ("cifg", "indrnn", "mgu", "nfg", "noaf", "peephole")


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def one_step(name: str, weights: list[np.ndarray], state: list[float]) -> list[float]:
    """One step of the cell called ``name`` (1 unit, input 1.0) from ``state`` with these weights."""
    cell = cells.get(name).keras_class()(1)
    cell.build((None, 1))
    cell.set_weights([np.asarray(w, dtype="float32") for w in weights])
    states = [np.array([[s]], dtype="float32") for s in state]
    _, new = cell(np.ones((1, 1), dtype="float32"), states if len(states) > 1 else states[0])
    return [float(keras.ops.convert_to_numpy(s)[0, 0]) for s in new]


# Every LSTM variant below: each block's input weight 0.5, recurrent weight 0.25, bias 0; x = 1, h = 0.2, c = 0.4,
# so every gate's pre-activation is a = 0.5 + 0.25 * 0.2 = 0.55: sigmoid(a) = 0.634136, tanh(a) = 0.500520.
A = 0.55
LSTM_STATE = [0.2, 0.4]


def lstm_weights(blocks: int, *extra: np.ndarray) -> list[np.ndarray]:
    return [np.full((1, blocks), 0.5), np.full((1, blocks), 0.25), np.zeros(blocks), *extra]


@pytest.mark.parametrize(
    ("name", "weights", "c", "h"),
    [
        # peepholes p_i, p_f, p_o = 0.1, 0.2, 0.3: i = s(a + 0.04), f = s(a + 0.08), c' = 0.4 f + i tanh(a),
        # o = s(a + 0.3 c'), h' = o tanh(c')
        ("peephole", lstm_weights(4, np.array([[0.1], [0.2], [0.3]])), 0.5830130, 0.3535854),
        # f = 1 - i: c' = 0.4 (1 - s(a)) + s(a) tanh(a), h' = s(a) tanh(c')
        ("cifg", lstm_weights(3), 0.4637434, 0.2746633),
        # f = 1: c' = 0.4 + s(a) tanh(a), h' = s(a) tanh(c')
        ("nfg", lstm_weights(3), 0.7173977, 0.3901803),
        # the LSTM's c' = 0.4 s(a) + s(a) tanh(a), and h' = s(a) c' (Keras' LSTM gives s(a) tanh(c') = 0.3272973)
        ("noaf", lstm_weights(4), 0.5710519, 0.3621243),
    ],
)
def test_one_step_of_each_lstm_variant_matches_the_hand_computed_numbers(name, weights, c, h):
    h_new, c_new = one_step(name, weights, LSTM_STATE)
    assert (h_new, c_new) == (pytest.approx(h, abs=1e-6), pytest.approx(c, abs=1e-6))
    assert sigmoid(A) == pytest.approx(0.634136, abs=1e-6) and math.tanh(A) == pytest.approx(0.500520, abs=1e-6)


def test_one_step_of_the_minimal_gated_unit():
    """W_f = W_h = 0.5, U_f = U_h = 0.25, b = 0, x = 1, h = 0.2: f = s(0.55) = 0.634136,
    h~ = tanh(0.5 + 0.25 f 0.2) = tanh(0.531707), h' = (1 - f) 0.2 + f h~ = 0.3817970."""
    (h_new,) = one_step("mgu", [np.full((1, 2), 0.5), np.full((1, 2), 0.25), np.zeros(2)], [0.2])
    assert h_new == pytest.approx(0.3817970, abs=1e-6)


@pytest.mark.parametrize(("w", "expected"), [(0.5, 0.58), (-1.0, 0.0)])  # relu(w + 0.9 * 0.2 - 0.1)
def test_one_step_of_the_indrnn_is_relu_of_its_own_recurrence(w, expected):
    (h_new,) = one_step("indrnn", [np.array([[w]]), np.array([0.9]), np.array([-0.1])], [0.2])
    assert h_new == pytest.approx(expected, abs=1e-6)


def test_the_variants_are_found_by_name_without_importing_them():
    assert set(VARIANTS) <= set(cells.names()) and cells.variants() == VARIANTS
    assert [cells.display(v) for v in VARIANTS] == ["CIFG", "IndRNN", "MGU", "NFG", "NOAF", "PeepholeLSTM"]
    assert cells.display("bimgu") == "BiMGU"


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_has_its_model_config_and_passes_validation(name, make_cfg):
    cfg = make_cfg(f"model={name}")
    assert cfg.model.cell == name
    config.validate(cfg)


@pytest.mark.parametrize(
    ("name", "params"),
    [  # input 3, 4 units: kernels 3x(4b) and 4x(4b), bias 4b for b blocks (+ peepholes 3x4; IndRNN: a vector)
        ("peephole", 3 * 16 + 4 * 16 + 16 + 12),
        ("cifg", 3 * 12 + 4 * 12 + 12),
        ("nfg", 3 * 12 + 4 * 12 + 12),
        ("noaf", 3 * 16 + 4 * 16 + 16),
        ("mgu", 3 * 8 + 4 * 8 + 8),
        ("indrnn", 3 * 4 + 4 + 4),
    ],
)
def test_each_variants_size(name, params):
    layer = models.recurrent_layer(model_cfg(cell=name, units=4), return_sequences=False, name="rec")
    layer(keras.ops.zeros((2, 5, 3)))
    assert layer.count_params() == params


@pytest.mark.parametrize("name", ["peephole", "mgu"])
def test_a_variant_model_saves_and_loads_with_the_same_predictions(name, tmp_path):
    inputs = keras.Input((5, 3))
    outputs = keras.layers.Dense(1)(models.recurrent_layer(model_cfg(cell=name, units=4), False, "rec")(inputs))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(2, 5, 3)).astype("float32")
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_learns_the_toy_task(name, make_cfg):
    """Chance is 0.5 (balanced linear and random sequences); each cell learns it in a few epochs."""
    small = ("data.n_train=256", "data.n_val=64", "data.n_test=128")
    prepare.run(make_cfg(*small))
    cfg = make_cfg(*small, "experiment=toy_dynamic", f"model={name}", "model.units=16", "trainer.epochs=20")
    cfg.tracking.log_model = False
    result = train.run(cfg)
    assert result["metrics"]["test/accuracy"] > 0.7


@pytest.mark.parametrize("dataset", ["mnist", "imdb"])
@pytest.mark.parametrize("name", ["lstm", "peephole", "cifg", "nfg", "noaf", "gru", "mgu"])
def test_the_variants_study_sizes_every_cell_to_the_lstms_budget(dataset, name):
    """sweep=lstm_variants_<dataset>: each cell within 2% of the LSTM's parameter count (or the nearest it can)."""
    base = compose_config([f"experiment={dataset}_lstm"]).model
    budget = OmegaConf.load(CONF / "sweep" / f"lstm_variants_{dataset}.yaml").model.param_budget
    cfg = OmegaConf.merge(base, {"cell": name})
    units, count = models.units_for_budget(cfg, METAS[dataset], budget)
    assert abs(count - budget) <= 0.02 * budget, (units, count)
