"""What the test modules share, in one place: real Hydra composition with every output inside a temporary folder,
the tiny models and datasets several modules train, and the rule for tests that need the real datasets or
PostgreSQL (skipped on a laptop without them, failed in CI, which must run them)."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.pop("RNNLAB_ROOT", None)
# no compile cache in tests (an empty folder turns TensorFlow's off): every test compiles as a fresh machine would;
# tests/test_xla_cache.py runs the cache in processes of its own
os.environ["TF_XLA_FLAGS"] = "--tf_xla_persistent_cache_directory="

from pipeline import config, teamserver  # noqa: E402
from pipeline.data import Dataset, save  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

config.register()


# --- Configs ---------------------------------------------------------------------------------------------------
def compose_config(overrides: list[str] | None = None, config_name: str = "config", hydra: bool = False) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` exactly as the command line would, with these overrides (and Hydra's own
    settings under ``hydra`` when asked: the sweep mode and sweeper)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=list(overrides or []), return_hydra_config=hydra)


QUIET = {"config": ["trainer.verbose=0"]}  # per entry point: no progress output in the tests' logs


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose an entry point's config (``top``: config = training, download, prepare, report, bench, generate,
    ui) whose data, reports, models and MLflow store all live under ``tmp_path``."""

    def make(*overrides: str, top: str = "config") -> DictConfig:
        return compose_config([f"paths.root={tmp_path}", *QUIET.get(top, []), *overrides], config_name=top)

    return make


# --- MLflow stores ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite store, made once by MLflow itself (its tables and migrations take a second or two to
    create, every time): tests start their stores as copies of it."""
    path = tmp_path_factory.mktemp("store_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def copy_store(template: Path, root: Path) -> str:
    """An empty store at ``root``/mlflow.db, where ``paths.root=<root>`` tracks; its URI."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, root / "mlflow.db")
    return f"sqlite:///{root}/mlflow.db"


@pytest.fixture
def mlflow_store(tmp_path: Path, store_template: Path) -> str:
    """An empty MLflow store at ``tmp_path``/mlflow.db, the one ``make_cfg``'s configs track into; its URI.
    (Tests of how the pipeline creates or refuses a store leave this out.)"""
    return copy_store(store_template, tmp_path)


# --- Real parts a test may need: the dataset mirror, PostgreSQL --------------------------------------------------
def mirror_path() -> Path | None:
    """The verified dataset mirror beside the checkout (../shared/datasets), or $RNNLAB_DATA_MIRROR."""
    candidate = Path(os.environ.get("RNNLAB_DATA_MIRROR") or REPO.parent / "shared" / "datasets")
    return candidate if (candidate / "MANIFEST.md").exists() else None


def have_postgres() -> bool:
    try:
        teamserver.pg_bin("initdb")
    except teamserver.ServerError:
        return False
    return True


def in_ci() -> bool:
    """CI sets CI=true: there a test whose real parts are missing fails instead of skipping."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def needs_mirror(test: Callable) -> Callable:
    """The real datasets from the mirror: an integration test (minutes of downloads, preparation and training)."""
    return pytest.mark.integration(pytest.mark.needs_mirror(test))


MISSING = {
    "needs_mirror": (
        lambda: mirror_path() is None,
        "no dataset mirror: put it at ../shared/datasets or set RNNLAB_DATA_MIRROR=<folder>",
    ),
    "needs_postgres": (lambda: not have_postgres(), "PostgreSQL is not installed: apt-get install postgresql"),
}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked needs_mirror or needs_postgres skips without them, before its fixtures run, except in CI,
    where a skip would hide that the whole-pipeline, preset or server tests never ran."""
    for marker, (missing, reason) in MISSING.items():
        if item.get_closest_marker(marker) and missing():
            if in_ci():
                pytest.fail(f"{reason} (CI={os.environ['CI']}: CI runs every test, none may skip)", pytrace=False)
            pytest.skip(reason)


# --- Tiny models -----------------------------------------------------------------------------------------------
CLASSIFIER_META = {
    "name": "toy",
    "kind": "classification",
    "input": "dense",
    "features": 1,
    "pad_value": -1.0,
    "num_classes": 2,
}
LM_META = {"name": "tiny", "kind": "language_model", "input": "tokens", "vocab_size": 20}


def model_cfg(**kw: Any) -> DictConfig:
    """A ``model`` section: one LSTM layer of 8 units unless told otherwise."""
    base = dict(
        cell="lstm",
        bidirectional=False,
        layers=1,
        units=8,
        dropout=0.0,
        recurrent_dropout=0.0,
        embedding_dim=None,
    )
    return OmegaConf.create({**base, **kw})


def lm_cfg(**kw: Any) -> DictConfig:
    """A language model's ``model`` section: two layers, uniform initialisation."""
    return model_cfg(**{"layers": 2, "init_scale": 0.5, **kw})


def padded(seq: list[float] | np.ndarray, total: int) -> np.ndarray:
    """One sequence of ``CLASSIFIER_META``'s steps, padded to ``total`` steps with its pad value."""
    out = np.full((1, total, 1), -1.0, dtype=np.float32)
    out[0, : len(seq), 0] = seq
    return out


# --- Tiny files and datasets ---------------------------------------------------------------------------------------
def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A .tar.gz holding these members (name -> bytes)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


TINY_VOCAB = ["<eos>", "the", "company", "said", "<unk>", *[f"w{i}" for i in range(15)]]  # 20 words
TINY_PERIOD = ["the", "company", "said", "w0", "w1", "w2", "<eos>"]  # the stream repeats these 7 words


def write_tiny_ptb(root: Path) -> None:
    """A prepared 'ptb' under ``root`` whose vocabulary and streams are small enough to train in seconds: a
    periodic (learnable) stream, so a working language model's perplexity must fall towards 1."""
    stream = np.tile(np.array([TINY_VOCAB.index(w) for w in TINY_PERIOD]), 100)
    splits = {s: {"ids": stream[:n].astype(np.int32)} for s, n in (("train", 420), ("val", 140), ("test", 140))}
    meta = {**LM_META, "name": "ptb", "eos_id": 0, "unk_id": 4}
    save(root / "data/prepared/ptb", Dataset(splits=splits, meta=meta, stats={}, vocab=TINY_VOCAB))


def tiny_ptb_cfg(root: Path, *overrides: str) -> DictConfig:
    """The ptb_small preset, shrunk to the tiny PTB: 32 units, windows of 5, batches of 4, 3 epochs."""
    return compose_config(
        [
            f"paths.root={root}",
            "trainer.verbose=0",
            "experiment=ptb_small",
            "model.units=32",
            "model.init_scale=0.5",
            "trainer.batch_size=4",
            "trainer.bptt_steps=5",
            "trainer.epochs=3",
            "trainer.generate_words=7",  # the prime and one period: "the company said w0 w1 w2 <eos> the ..."
            "optimizer.lr_decay_start=1",
            *overrides,
        ]
    )


@pytest.fixture
def tiny_ptb(tmp_path: Path, mlflow_store: str) -> Callable[..., DictConfig]:
    """The tiny PTB prepared under ``tmp_path`` (and an empty store); returns a function composing its training
    config."""
    write_tiny_ptb(tmp_path)
    return lambda *overrides: tiny_ptb_cfg(tmp_path, *overrides)


@pytest.fixture(scope="session")
def trained_lm(tmp_path_factory: pytest.TempPathFactory, store_template: Path) -> tuple[Path, dict[str, Any]]:
    """One tiny language model trained (bfloat16 output gradients, the PTB presets' choice on CPUs that have
    bfloat16 instructions) and logged to MLflow, for the checks of what training logs and of generating from it:
    its root folder and ``train.run``'s result."""
    from pipeline import train

    root = tmp_path_factory.mktemp("trained_lm")
    copy_store(store_template, root)
    write_tiny_ptb(root)
    return root, train.run(tiny_ptb_cfg(root, "trainer.precision=bfloat16_grad"))
