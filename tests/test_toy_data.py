import json

import numpy as np
import pytest

from pipeline import data, prepare
from pipeline.data import toy


def gen(n=400, min_len=3, max_len=20, max_value=1000, seed=0):
    return toy.generate(n, min_len, max_len, max_value, -1.0, np.random.default_rng(seed))


def test_shapes_dtypes_and_balance():
    s = gen()
    assert s["x"].shape == (400, 20, 1) and s["x"].dtype == np.float32
    assert s["y"].shape == (400,) and set(np.unique(s["y"])) == {0, 1}
    assert s["y"].sum() == 200  # exactly 50/50


def test_lengths_cover_the_range_and_padding_is_on_the_right():
    s = gen(n=2000)
    assert s["lengths"].min() == 3 and s["lengths"].max() == 20
    for x, length in zip(s["x"][:, :, 0], s["lengths"], strict=True):
        assert np.all(x[length:] == -1.0)  # padding after the true length
        assert np.all((x[:length] >= 0) & (x[:length] < 1))  # values scaled into [0, 1)


def test_linear_sequences_step_by_one_over_max_value():
    s = gen(max_value=1000)
    for x, y, length in zip(s["x"][:, :, 0], s["y"], s["lengths"], strict=True):
        steps = np.diff(x[:length].astype(np.float64))
        if y == 1:
            np.testing.assert_allclose(steps, 1 / 1000, atol=1e-6)
        elif length > 3:
            assert not np.allclose(steps, 1 / 1000, atol=1e-6)


def test_hand_computed_tiny_case():
    # min_len == max_len == 3, max_value == 10: every value is an integer tenth.
    s = toy.generate(4, 3, 3, 10, -1.0, np.random.default_rng(7))
    values = s["x"][:, :, 0] * 10
    np.testing.assert_allclose(values, np.round(values), atol=1e-5)
    for v, y in zip(values, s["y"], strict=True):
        if y == 1:
            np.testing.assert_allclose(np.diff(v), [1, 1], atol=1e-5)


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = gen(seed=1), gen(seed=1), gen(seed=2)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], c["x"])


def test_prepare_stage_writes_splits_meta_and_stats(make_cfg, tmp_path):
    cfg = make_cfg("data.n_train=100", "data.n_val=20", "data.n_test=50", "data.max_len=12", top="prepare")
    stats = prepare.run(cfg)
    folder = tmp_path / "data" / "prepared" / "toy"
    assert sorted(p.name for p in folder.iterdir()) == [
        "meta.json",
        "stats.json",
        "test.npz",
        "train.npz",
        "val.npz",
    ]
    assert json.loads((folder / "stats.json").read_text()) == stats
    assert stats["train"]["n"] == 100 and stats["val"]["n"] == 20 and stats["test"]["n"] == 50
    assert stats["train"]["linear_fraction"] == 0.5 and stats["train"]["max_len"] <= 12
    loaded = data.load(tmp_path / "data", "toy")
    assert loaded.meta["num_classes"] == 2 and loaded.splits["train"]["x"].shape == (100, 12, 1)
    # The digest is the data version: stable for the same content, different for other content.
    assert data.load(tmp_path / "data", "toy").digest == loaded.digest
    prepare.run(make_cfg("data.n_train=100", "data.n_val=20", "data.n_test=50", "data.seed=99", top="prepare"))
    assert data.load(tmp_path / "data", "toy").digest != loaded.digest


def test_missing_prepared_data_says_how_to_make_it(tmp_path):
    with pytest.raises(data.DataError, match=r"python -m pipeline.prepare data=toy"):
        data.load(tmp_path, "toy")
