"""The long-range memory tasks: the adding problem, the copy task and MNIST read pixel by pixel (in order or
permuted), checked on cases small enough to verify by hand, then trained for real on tiny versions."""

import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline import config, data, models, objective, prepare, report, train
from pipeline.data import adding, copy_memory, mnist
from tests.conftest import CONF, compose_config
from tests.test_datasets import write_idx


def test_a_length_5_adding_example_marks_one_value_in_each_half_and_sums_them():
    out = adding.generate(1, 5, np.random.default_rng(0))
    values, markers = out["x"][0, :, 0], out["x"][0, :, 1]
    marked = np.flatnonzero(markers)
    assert out["x"].shape == (1, 5, 2) and out["y"].shape == (1, 1)
    assert len(marked) == 2 and marked[0] < 2 <= marked[1]  # first half [0, 2), second half [2, 5)
    assert set(np.unique(markers)) == {0.0, 1.0}
    assert out["y"][0, 0] == pytest.approx(values[marked[0]] + values[marked[1]])
    assert ((values >= 0) & (values < 1)).all()


def test_predicting_1_on_the_adding_problem_scores_one_sixth():
    y = adding.generate(50_000, 20, np.random.default_rng(1))["y"]
    assert np.mean((y - 1.0) ** 2) == pytest.approx(1 / 6, abs=0.004)
    assert pytest.approx(0.1667, abs=1e-4) == adding.BASELINE_MSE


def test_a_copy_sequence_is_ten_symbols_blanks_the_delimiter_and_their_recall():
    out = copy_memory.generate(1, 3, np.random.default_rng(0))
    x, y = out["x"][0].tolist(), out["y"][0].tolist()
    symbols = x[:10]
    assert len(x) == len(y) == 3 + 20
    assert all(1 <= s <= 8 for s in symbols)
    assert x[10:] == [0, 0, 9] + [0] * 10  # delay - 1 blanks, the delimiter, 10 blanks
    assert y == [0] * 13 + symbols  # blanks for delay + 10 steps, then the symbols in order


def test_the_copy_baseline_is_10_log_8_over_t_plus_20():
    assert copy_memory.baseline_loss(100) == pytest.approx(10 * math.log(8) / 120)
    assert copy_memory.baseline_loss(100) == pytest.approx(0.1733, abs=1e-4)
    # The memoryless strategy, scored on generated data: certain blanks, then 1/8 on each recalled symbol.
    y = copy_memory.generate(4, 100, np.random.default_rng(2))["y"]
    probs = np.where(y[..., None] == 0, np.eye(10)[0], np.r_[0, np.full(8, 1 / 8), 0])
    xent = -np.log(np.take_along_axis(probs, y[..., None], -1)).mean()
    assert xent == pytest.approx(copy_memory.baseline_loss(100))


def write_mnist(raw, n_train=4, n_test=2):
    """IDX files of tiny 28x28 'images' whose pixel k of image i is (i + k) mod 256: every position tells."""
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        pixels = (np.arange(n)[:, None] + np.arange(784)[None, :]) % 256
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", 2051, (n, 28, 28), bytes(pixels.astype(np.uint8)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", 2049, (n,), bytes((np.arange(n) % 2).astype(np.uint8)))


def mnist_cfg(make_cfg, name, *overrides):
    return make_cfg(f"data={name}", "data.val_size=2", *overrides, top="prepare").data


def test_sequential_mnist_reads_one_pixel_a_step_in_reading_order(make_cfg, tmp_path):
    write_mnist(tmp_path / "raw")
    ds = mnist.build(mnist_cfg(make_cfg, "smnist"), tmp_path / "raw")
    x = ds.splits["test"]["x"]
    assert x.shape == (2, 784, 1) and ds.meta["steps"] == 784 and ds.meta["features"] == 1
    assert np.allclose(x[1, :, 0] * 255, (1 + np.arange(784)) % 256)
    assert ds.meta["permutation"] is None


def test_permuted_mnist_reads_the_pixels_in_the_seeds_fixed_order_and_records_it(make_cfg, tmp_path):
    write_mnist(tmp_path / "raw")
    ds = mnist.build(mnist_cfg(make_cfg, "pmnist", "data.permutation_seed=7"), tmp_path / "raw")
    order = np.random.default_rng(7).permutation(784)
    assert ds.meta["permutation"] == order.tolist() and sorted(order) == list(range(784))
    for split in ("train", "val", "test"):  # one order for every image of every split
        x = ds.splits[split]["x"][..., 0] * 255
        first = np.rint(x[:, 0] - order[0]) % 256  # image i's pixel k is (i + k) mod 256
        assert np.allclose(np.rint(x) % 256, (first[:, None] + order[None, :]) % 256)
    rows = mnist.build(mnist_cfg(make_cfg, "mnist"), tmp_path / "raw")
    assert rows.splits["test"]["x"].shape == (2, 28, 28)


def test_a_permutation_of_rows_is_refused_in_one_line(make_cfg):
    with pytest.raises(config.ConfigError, match=r"data.permutation_seed: permutes the pixels of order=pixels"):
        config.validate(make_cfg("data=mnist", "data.permutation_seed=3"))
    with pytest.raises(config.ConfigError, match=r"data.order: unknown pixel order 'columns'"):
        config.validate(make_cfg("data=mnist", "data.order=columns"))


def test_each_kind_has_its_objective_and_anchor_metrics():
    assert objective.for_kind("regression") == objective.Objective("mse", higher=False)
    assert objective.for_kind("tagging") == objective.Objective("cross_entropy", higher=False)
    # A tagger logs accuracy too: its objective is still its cross-entropy.
    assert objective.of_metrics(["val/accuracy", "val/cross_entropy"]).metric == "cross_entropy"
    assert {"test/mse", "test/cross_entropy"} <= set(config.ANCHOR_METRICS)


@pytest.fixture
def tiny(make_cfg, mlflow_store):
    """Prepare a tiny version of a generated task and train it; returns (result, cfg)."""

    def run(name, *overrides, epochs=2):
        sizes = ("data.n_train=512", "data.n_val=128", "data.n_test=128", *overrides)
        prepare.run(make_cfg(f"data={name}", *sizes, top="prepare"))
        cfg = make_cfg(
            f"data={name}", *sizes, "model.units=16", "trainer.batch_size=32", f"trainer.epochs={epochs}",
            "optimizer=adam", "optimizer.learning_rate=0.01", "tracking.log_model=false",
        )  # fmt: skip
        return train.run(cfg), cfg

    return run


def test_an_lstm_beats_the_adding_baseline_at_t_5_and_the_report_shows_the_baseline(tiny, make_cfg, tmp_path):
    result, _ = tiny("adding", "data.length=5", epochs=6)
    metrics = result["metrics"]
    assert set(metrics) >= {"train/mse", "val/mse", "test/mse"} and "test/accuracy" not in metrics
    assert metrics["test/mse"] < 0.5 * adding.BASELINE_MSE  # it learnt to add, far below predicting 1
    boards = report.run(make_cfg(top="report"))
    text = (tmp_path / "reports" / "README.md").read_text()
    assert list(boards) == ["adding"] and "best val mse" in boards["adding"].columns
    assert "Baseline without memory (always predicting 1): test mse 0.1667." in text


def test_a_copy_task_tagger_logs_cross_entropy_per_step_and_its_baseline(tiny):
    result, cfg = tiny("copy_memory", "data.delay=3")
    metrics = result["metrics"]
    assert set(metrics) >= {"val/cross_entropy", "test/cross_entropy", "test/accuracy"}
    assert metrics["test/cross_entropy"] == metrics["test/loss"] < math.log(10)  # below guessing among 10 symbols
    tags = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(result["run_id"]).data.tags
    assert tags["baseline.metric"] == "cross_entropy"
    assert float(tags["baseline.value"]) == pytest.approx(10 * math.log(8) / 23)


def test_prepared_generated_tasks_round_trip(make_cfg):
    cfg = make_cfg("data=copy_memory", "data.delay=2", "data.n_train=8", "data.n_val=4", "data.n_test=4", top="prepare")
    prepare.run(cfg)
    ds = data.load(cfg.paths.data, "copy_memory")
    assert ds.splits["train"]["x"].shape == (8, 22) and ds.meta["kind"] == "tagging"
    assert ds.meta["baseline"]["value"] == pytest.approx(10 * math.log(8) / 22)


@pytest.mark.parametrize(
    ("sweep", "preset", "meta"),
    [
        ("cells_adding", "adding_lstm", {"name": "adding", "kind": "regression", "input": "dense", "features": 2}),
        ("cells_copy", "copy_lstm", {"name": "copy_memory", "kind": "tagging", "input": "one_hot", "vocab_size": 10,
                                     "num_classes": 10}),
    ],
)  # fmt: skip
def test_each_memory_sweep_sizes_every_cell_to_its_presets_lstm(sweep, preset, meta):
    cfg = compose_config([f"experiment={preset}"])
    budget = OmegaConf.load(CONF / "sweep" / f"{sweep}.yaml").model.param_budget
    assert models.count_params(cfg.model, meta, cfg.model.units) == budget
    for cell in ("rnn", "gru"):
        _, count = models.units_for_budget(OmegaConf.merge(cfg.model, {"cell": cell}), meta, budget)
        assert abs(count - budget) <= 0.02 * budget, cell
