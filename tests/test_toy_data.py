import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pipeline import data, prepare
from pipeline.data import toy
from tests.conftest import REPO

SMALL = ("data.n_train=100", "data.n_val=20", "data.n_test=50", "data.max_len=12")  # a toy set prepared in a blink
REBUILD = "dvc repro prepare_toy"  # the advice every damaged-data message gives


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
        "SHA256SUMS",
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
    assert data.digest(tmp_path / "data", "toy") == loaded.digest  # the same version, whether loaded or not
    prepare.run(make_cfg("data.n_train=100", "data.n_val=20", "data.n_test=50", "data.seed=99", top="prepare"))
    assert data.load(tmp_path / "data", "toy").digest != loaded.digest


def test_missing_prepared_data_says_how_to_make_it(tmp_path):
    with pytest.raises(data.DataError, match=r"python -m pipeline.prepare data=toy"):
        data.load(tmp_path, "toy")


# --- Damaged prepared data: refused in one line that names the file and the command that rebuilds it ------------
@pytest.fixture
def toy_folder(make_cfg, tmp_path):
    """A small toy set prepared by the real stage; its folder."""
    prepare.run(make_cfg(*SMALL, top="prepare"))
    return tmp_path / "data" / "prepared" / "toy"


def flip(path, n=64):
    """Invert ``n`` bytes in the middle of a file: damage that keeps its size."""
    payload = bytearray(path.read_bytes())
    middle = len(payload) // 2
    payload[middle : middle + n] = bytes(b ^ 0xFF for b in payload[middle : middle + n])
    path.write_bytes(bytes(payload))


def test_prepare_records_every_file_in_a_sha256sum_list(toy_folder):
    lines = (toy_folder / "SHA256SUMS").read_text().splitlines()
    recorded = dict(reversed(line.split("  ", 1)) for line in lines)
    assert sorted(recorded) == ["meta.json", "stats.json", "test.npz", "train.npz", "val.npz"]
    for name, hexdigest in recorded.items():
        assert hashlib.sha256((toy_folder / name).read_bytes()).hexdigest() == hexdigest
    if shutil.which("sha256sum"):  # verifiable by hand
        subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=toy_folder, check=True)


def swap_in_val(folder):
    """Another valid .npz in place of train.npz: a mix-up a zip check cannot see."""
    shutil.copyfile(folder / "val.npz", folder / "train.npz")


def truncate(folder):
    path = folder / "train.npz"
    path.write_bytes(path.read_bytes()[:1000])


DAMAGE = {
    "flipped bytes": (lambda f: flip(f / "train.npz"), r"train\.npz.*sha256 [0-9a-f]{8}.*recorded [0-9a-f]{8}"),
    "another valid npz": (swap_in_val, r"train\.npz.*sha256 [0-9a-f]{8}.*recorded [0-9a-f]{8}"),
    "truncated": (truncate, r"train\.npz"),
    "missing split": (lambda f: (f / "val.npz").unlink(), r"val\.npz.*missing"),
    "garbage meta.json": (lambda f: (f / "meta.json").write_text("{not json"), r"meta\.json"),
    "unrecorded split": (lambda f: shutil.copyfile(f / "val.npz", f / "extra.npz"), r"extra\.npz.*not.*SHA256SUMS"),
    "no checksums (an older prepare)": (lambda f: (f / "SHA256SUMS").unlink(), r"SHA256SUMS"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_prepared_data_is_refused_in_one_line(toy_folder, tmp_path, damage):
    harm, names = DAMAGE[damage]
    harm(toy_folder)
    with pytest.raises(data.DataError) as caught:
        data.load(tmp_path / "data", "toy")
    message = str(caught.value)
    assert "\n" not in message and REBUILD in message and "python -m pipeline.prepare data=toy" in message
    assert re.search(names, message), message


def rerecord(folder, file):
    """Record a file's current sha256 in SHA256SUMS, as a hand-run `sha256sum` would after damaging it."""
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    fresh = hashlib.sha256((folder / file).read_bytes()).hexdigest()
    lines = [f"{fresh}  {file}" if line.endswith(f"  {file}") else line for line in lines]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(("file", "harm"), [("train.npz", flip), ("meta.json", lambda p: p.write_text("[1, 2"))])
def test_a_recorded_file_that_does_not_parse_is_refused_in_one_line(toy_folder, tmp_path, file, harm):
    harm(toy_folder / file)
    rerecord(toy_folder, file)  # its sha256 matches: the parser is what finds the damage
    with pytest.raises(
        data.DataError, match=rf"^cannot read [^\n]*{re.escape(file)} \([^\n]*\); rebuild it: `{REBUILD}`"
    ):
        data.load(tmp_path / "data", "toy")


def test_garbage_meta_json_is_refused_before_training_sizes_a_model(toy_folder, tmp_path):
    (toy_folder / "meta.json").write_bytes(b"\x00" * 40)
    with pytest.raises(data.DataError, match=rf"^[^\n]*meta\.json[^\n]*{REBUILD}[^\n]*$"):
        data.load_meta(tmp_path / "data", "toy")


def test_training_on_flipped_data_stops_with_the_damaged_file_and_the_fix(toy_folder, make_cfg):
    from pipeline import train  # TensorFlow: imported only by the tests that train

    flip(toy_folder / "train.npz")
    with pytest.raises(data.DataError, match=rf"^[^\n]*train\.npz[^\n]*{REBUILD}[^\n]*$"):
        train.run(make_cfg(*SMALL, "budget=smoke", "tracking.enabled=false"))


@pytest.mark.integration  # a real process
def test_train_command_on_damaged_data_exits_1_with_one_line(make_cfg, tmp_path):
    prepare.run(make_cfg(top="prepare"))
    flip(tmp_path / "data" / "prepared" / "toy" / "train.npz")
    env = {k: v for k, v in os.environ.items() if k not in ("RNNLAB_ROOT", "HYDRA_FULL_ERROR")}
    overrides = [f"paths.root={tmp_path}", "data=toy", "budget=smoke", "tracking.enabled=false", "trainer.verbose=0"]
    cmd = [sys.executable, "-m", "pipeline.train", *overrides]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "train.npz" in errors[0] and REBUILD in errors[0], output
    assert "Traceback" not in output
