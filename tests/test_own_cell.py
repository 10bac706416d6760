"""A cell from the user's own code, named by import path (``model.cell=package.module:Class``): checked when the
config is, trained on a classifier and a language model, shown by its class name. The module is the README's example
(``examples/my_cell.py``), written to a temporary folder as a user's would be."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import cells, config, generate, models, prepare, train
from tests.conftest import REPO, compose_config, model_cfg
from tests.test_compare import METAS

SMALL_DATA = ("data.n_train=128", "data.n_val=32", "data.n_test=64")
OWN = "user_cells:LeakyCell"


@pytest.fixture
def own_cell(tmp_path, monkeypatch):
    """examples/my_cell.py as the user's module ``user_cells`` on the import path."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    shutil.copy(REPO / "examples" / "my_cell.py", folder / "user_cells.py")
    monkeypatch.syspath_prepend(str(folder))
    yield OWN
    cells.unregister(OWN)


def test_a_cell_by_import_path_trains_a_classifier(own_cell, make_cfg, mlflow_store):
    prepare.run(make_cfg(*SMALL_DATA))
    result = train.run(make_cfg(*SMALL_DATA, "budget=smoke", "model=rnn", f"model.cell={own_cell}", "model.units=8"))
    run = MlflowClient(tracking_uri=mlflow_store).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["cell"] == own_cell
    assert 0 <= result["metrics"]["test/accuracy"] <= 1
    assert cells.display(own_cell) == "LeakyCell" and cells.display(f"bi{own_cell}") == "BiLeakyCell"


def test_a_cell_by_import_path_trains_a_language_model_that_generates(own_cell, tiny_ptb, tmp_path):
    result = train.run(tiny_ptb(f"model.cell={own_cell}", "model.init_scale=null", "trainer.generate_words=0"))
    ppl = result["metrics"]["val/perplexity"]
    assert math.isfinite(ppl) and ppl < 7  # a periodic stream of 7 words: learning beats uniform guessing
    cells.unregister(own_cell)  # generating finds the cell again through the run that logged the model
    cfg = compose_config(
        [f"paths.root={tmp_path}", f"run_id={result['run_id']}", "strategy=greedy", "words=5"], config_name="generate"
    )
    text = generate.run(cfg)
    assert text.startswith("the company said ") and len(text.split()) == 3 + 5


def test_a_cell_by_import_path_stacks_and_reads_both_ways(own_cell):
    import keras

    layer = models.recurrent_layer(model_cfg(cell=own_cell, units=4, bidirectional=True), False, "leaky_1")
    assert layer(keras.ops.zeros((2, 5, 3))).shape == (2, 8)
    assert layer.count_params() == 2 * (3 * 4 + 4 * 4 + 4 + 4)  # kernel, recurrent, bias, rate per direction


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("no_such_module:Cell", r"cannot import it \(ModuleNotFoundError"),
        ("user_cells:NoSuchCell", r"cannot import it \(AttributeError"),
        ("keras.layers:Dense", "not a Keras RNN cell|names .*Dense"),
        ("math:pi", "names 3.14"),
    ],
)
def test_a_path_that_is_not_an_rnn_cell_is_refused_in_one_line_naming_model_cell(own_cell, make_cfg, path, says):
    with pytest.raises(config.ConfigError, match=f"model.cell='{path}'") as err:
        config.validate(make_cfg(f"model.cell={path}"))
    assert "\n" not in str(err.value)
    assert re.search(says, str(err.value))


BROKEN = {
    "syntax_cells": "class Cell(:\n    pass\n",
    "failing_cells": "import keras\nraise RuntimeError('no GPU here')\n",
}


@pytest.mark.parametrize("module", sorted(BROKEN))
def test_a_cell_module_whose_code_fails_to_import_is_refused_in_one_line(tmp_path, make_cfg, monkeypatch, module):
    (tmp_path / f"{module}.py").write_text(BROKEN[module])
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(config.ConfigError, match=rf"model.cell='{module}:Cell': cannot import it \(\w+Error"):
        config.validate(make_cfg(f"model.cell={module}:Cell"))
    with pytest.raises(config.ConfigError, match="on PYTHONPATH"):  # a module not found says where to put it
        config.validate(make_cfg("model.cell=not_on_the_path:Cell"))


def test_a_setting_the_own_cell_does_not_take_is_refused_with_the_config(own_cell, make_cfg):
    with pytest.raises(config.ConfigError, match=r"\(LeakyCell\) takes no recurrent_dropout: leave model.rec"):
        config.validate(make_cfg(f"model.cell={own_cell}", "model.recurrent_dropout=0.1"))
    with pytest.raises(config.ConfigError, match="leave model.init_scale unset"):
        config.validate(make_cfg(f"model.cell={own_cell}", "model.init_scale=0.1"))
    assert config.validate(make_cfg(f"model.cell={own_cell}", "model.recurrent_dropout=0", "model.init_scale=null"))
    assert cells.display("not_importable_here:MyCell") == "MyCell"  # a report needs only its name


def test_an_edit_of_the_cell_code_is_another_configuration_and_another_fingerprint(tmp_path, make_cfg, monkeypatch):
    folder = tmp_path / "user_code"
    folder.mkdir()
    module = folder / "bio_cells.py"  # a module whose name starts with "bi" is not a bidirectional cell
    module.write_text((REPO / "examples" / "my_cell.py").read_text())
    monkeypatch.syspath_prepend(str(folder))
    cfg = make_cfg("model.cell=bio_cells:LeakyCell")
    before = config.fingerprint(cfg), config.config_id(cfg, "data", "float32")
    assert (
        cells.display("bio_cells:LeakyCell") == "LeakyCell" and cells.display("bibio_cells:LeakyCell") == "BiLeakyCell"
    )
    module.write_text(module.read_text() + "\n# a change to the cell's code\n")
    after = config.fingerprint(cfg), config.config_id(cfg, "data", "float32")
    assert before[0] != after[0] and before[1] != after[1]
    built_in = make_cfg()
    assert cells.code_digest("lstm") is None and "cell_code" not in json.dumps(config.result_config(built_in))
    cells.unregister("bio_cells:LeakyCell")


UNDECORATED = """
import keras


class Plain(keras.layers.SimpleRNNCell):  # no register_keras_serializable: rnnlab registers it
    pass
"""


@pytest.mark.integration
def test_a_logged_model_of_an_own_cell_loads_back_in_a_new_process_with_equal_predictions(
    tmp_path, make_cfg, mlflow_store, monkeypatch
):
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "plain_cells.py").write_text(UNDECORATED)
    monkeypatch.syspath_prepend(str(folder))
    prepare.run(make_cfg(*SMALL_DATA))
    result = train.run(make_cfg(*SMALL_DATA, "budget=smoke", "model.cell=plain_cells:Plain", "model.units=8"))
    cells.unregister("plain_cells:Plain")
    uri = result["model_uri"]
    script = (
        "import sys, numpy as np, mlflow\n"
        f"mlflow.set_tracking_uri({mlflow_store!r})\n"
        "from pipeline import tracking\n"
        f"m = tracking.load_model({uri!r})\n"
        "x = np.linspace(0, 0.02, 40, dtype='float32').reshape(2, 20, 1)\n"
        "np.save(sys.argv[1], m.predict(x, verbose=0))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{REPO}"}
    out = tmp_path / "pred.npy"
    subprocess.run([sys.executable, "-c", script, str(out)], env=env, check=True, cwd=REPO)
    x = np.linspace(0, 0.02, 40, dtype="float32").reshape(2, 20, 1)
    np.testing.assert_allclose(np.load(out), result["model"].predict(x, verbose=0), rtol=1e-5)


SWEEP = (
    "data.n_train=600",
    "data.n_val=64",
    "data.n_test=64",
    "model.units=16",
    "trainer.epochs=4",
    "trainer.batch_size=4",
    "tracking.log_model=false",
)


@pytest.mark.integration  # real processes
def test_an_own_cell_sweeps_over_2_seeds_and_resumes_after_sigterm_to_the_same_metrics(own_cell, make_cfg, tmp_path):
    prepare.run(make_cfg(*SWEEP))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tmp_path / "user_code")}
    env.pop("RNNLAB_ROOT", None)
    sweep = [sys.executable, "-m", "pipeline.train", "-m", f"paths.root={tmp_path}", "trainer.verbose=0", *SWEEP]
    sweep += [f"model.cell={own_cell}", "seed=1,2", "trainer.intra_op_threads=1"]
    proc = subprocess.Popen(sweep, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list((tmp_path / "checkpoints").glob("*/state.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # the first job, after a checkpointed epoch
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    again = subprocess.run(sweep, cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("rnnlab-toy").experiment_id
    jobs = [r for r in client.search_runs([experiment]) if r.data.tags.get("sweep_role") != "parent"]
    finished = {r.data.params["seed"]: r for r in jobs if r.info.status == "FINISHED"}
    assert set(finished) == {"1", "2"} and all(r.data.tags["cell"] == own_cell for r in finished.values())
    assert any("resumed_at_epoch" in r.data.tags for r in finished.values())
    fresh = train.run(make_cfg(*SWEEP, f"model.cell={own_cell}", "seed=1", "tracking.enabled=false"))
    assert finished["1"].data.metrics["test/accuracy"] == pytest.approx(fresh["metrics"]["test/accuracy"], abs=1e-6)
    assert finished["1"].data.metrics["test/loss"] == pytest.approx(fresh["metrics"]["test/loss"], rel=1e-5)


FACTORY = '''
import keras


def leaky_layer(units, recurrent_dropout=0.0, dtype=None, **layer_settings):
    """A factory of a whole recurrent layer that runs the user's cell (its settings: return_sequences, name, ...)."""
    from user_cells import LeakyCell

    assert recurrent_dropout == 0.0, "LeakyCell has no recurrent dropout"
    return keras.layers.RNN(LeakyCell(units, dtype=dtype), dtype=dtype, **layer_settings)
'''


@pytest.mark.parametrize("path", ["user_factories:leaky_layer", "keras.layers:GRU", OWN])
def test_param_budget_sizes_a_cell_by_path_on_the_model_it_builds(own_cell, tmp_path, path):
    (tmp_path / "user_code" / "user_factories.py").write_text(FACTORY)
    meta = METAS["toy"]
    cfg = model_cfg(cell=path, units=8, layers=2)
    units, count = models.units_for_budget(cfg, meta, 5000)
    assert count == models.count_params(cfg, meta, units)  # counted on the very model the path builds
    assert abs(count - 5000) <= 0.05 * 5000, (units, count)
    cells.unregister(path)
