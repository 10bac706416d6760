"""The dataset registry: every dataset is one module's SPEC, found by itself; a dataset added from a test (no project
file edited) is validated, prepared and trained like a built-in one; an unknown data.source says what exists."""

import dataclasses
import re

import numpy as np
import pytest
import yaml
from hydra.core.config_store import ConfigStore
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline import config, data, download, prepare, train
from pipeline.data import registry, toy
from pipeline.schema import Bound
from tests.conftest import REPO, compose_config

# toy's generator under a new name: small splits, one short epoch of the smoke budget.
COPY = ("data=toy", "data.source=toy_copy", "data.name=toy_copy")
SMALL = ("data.n_train=64", "data.n_val=16", "data.n_test=32", "data.max_len=12")
N_TRAIN_BOUND = Bound(1, 500, note=" (the copy's own range)")


@dataclasses.dataclass
class ToyCopyConfig(toy.ToyDataConfig):
    """Its own schema class, so that messages about its keys name it."""


@pytest.fixture
def toy_copy():
    """toy's generator registered as the dataset ``toy_copy`` for this test only: the built-in set after it."""
    spec = registry.DatasetSpec(
        source="toy_copy",
        kind="classification",
        schema=ToyCopyConfig,
        bounds={**toy.SPEC.bounds, "n_train": N_TRAIN_BOUND},
        check=toy.check,
        build=toy.build,
    )
    before = registry.sources()
    with registry.registered(spec):
        yield spec
    assert registry.sources() == before
    ConfigStore.instance().repo["data"].pop("toy_copy_schema.yaml", None)  # what config.register() stored for it


def test_a_dataset_added_from_a_test_is_prepared_and_trained(toy_copy, make_cfg, mlflow_store, tmp_path):
    stats = prepare.run(make_cfg(*COPY, *SMALL))
    assert {split: s["n"] for split, s in stats.items()} == {"train": 64, "val": 16, "test": 32}
    assert all(s["linear_fraction"] == 0.5 and 3 <= s["min_len"] <= s["max_len"] <= 12 for s in stats.values())
    folder = data.prepared_dir(tmp_path / "data", "toy_copy")
    assert data.load_meta(tmp_path / "data", "toy_copy")["config"]["source"] == "toy_copy"

    prepare.run(make_cfg(*SMALL))  # the built-in toy with the same settings: the same generator, the same arrays
    with np.load(folder / "train.npz") as copy, np.load(tmp_path / "data/prepared/toy/train.npz") as original:
        assert all(np.array_equal(copy[k], original[k]) for k in ("x", "y", "lengths"))

    result = train.run(make_cfg(*COPY, *SMALL, "budget=smoke", "trainer.epochs=1", "model.units=8"))
    assert result["metrics"]["epochs"] == 1 and 0 <= result["metrics"]["test/accuracy"] <= 1
    run = MlflowClient(tracking_uri=mlflow_store).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dataset"] == "toy_copy"
    assert run.data.params["data.source"] == "toy_copy" and run.data.params["data.n_train"] == "64"


def test_a_registered_dataset_is_checked_by_its_own_spec(toy_copy):
    cfg = compose_config([*COPY, *SMALL, "data.n_train=600"])
    with pytest.raises(config.ConfigError, match=re.escape("data.n_train: must be in [1, 500] (the copy's own range)")):
        config.validate(cfg)
    with pytest.raises(config.ConfigError, match=r"^data\.min_len: need 1 <= data\.min_len <= data\.max_len"):
        config.validate(compose_config([*COPY, *SMALL, "data.min_len=30"]))  # its extra check
    with pytest.raises(config.ConfigError, match=r"^data\.kind: toy_copy is a classification dataset"):
        config.validate(compose_config([*COPY, *SMALL, "data.kind=language_model"]))

    plain = OmegaConf.to_container(compose_config([*COPY, *SMALL]))
    plain["data"]["n_trian"] = 5  # checked against ToyCopyConfig, which only the registry knows
    with pytest.raises(config.ConfigError, match=r"^data\.n_trian: no such key; did you mean data\.n_train\?"):
        config.validate(OmegaConf.create(plain))

    config.register()  # Hydra's schema node, for a conf/data file of its own
    assert "toy_copy_schema.yaml" in ConfigStore.instance().repo["data"]


def test_an_unknown_source_lists_the_known_ones(make_cfg):
    known = registry.sources()
    message = f"data.source: unknown dataset 'nope'; choose one of {known}"
    assert {"toy", "ptb", "imdb", "mnist"} <= set(known)
    for call in (
        lambda: config.validate(compose_config(["data.source=nope"])),
        lambda: prepare.run(make_cfg("data.source=nope", top="prepare")),
        lambda: download.run(make_cfg("data.source=nope", top="download")),
        lambda: registry.kind_of("nope"),
    ):
        with pytest.raises(config.ConfigError) as err:
            call()
        assert str(err.value) == message


def test_a_spec_that_cannot_work_is_refused(toy_copy):
    with pytest.raises(registry.SpecError, match="'toy_copy' is already registered"):
        registry.register(toy_copy)
    for change, problem in (
        ({"source": "toy-2"}, "letters, digits and '_' only"),
        ({"kind": "ranking"}, "choose one of classification, regression, tagging, language_model"),
        ({"schema": dict}, "a dataclass derived from pipeline.schema.DataConfig"),
        ({"bounds": {"n_trian": N_TRAIN_BOUND}}, "keys that ToyCopyConfig lacks: n_trian"),
    ):
        with pytest.raises(registry.SpecError, match=re.escape(problem)):
            registry.register(dataclasses.replace(toy_copy, **{"source": "toy_other", **change}))
    assert "toy_other" not in registry.sources()


def test_every_dataset_module_is_found_and_wired():
    """A module of pipeline/data with a SPEC is a dataset; its conf/data/<source>.yaml agrees with the SPEC, and
    dvc.yaml downloads (unless it is generated), prepares and trains it, and the report reads its metrics."""
    modules = {p.stem for p in (REPO / "pipeline/data").glob("*.py") if re.search(r"^SPEC = ", p.read_text(), re.M)}
    assert set(registry.sources()) == modules
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for spec in registry.specs():
        composed = compose_config([f"data={spec.source}"]).data
        assert (composed.source, composed.kind) == (spec.source, spec.kind), spec.source
        assert (f"download_{spec.source}" in stages) == (spec.download is not None), spec.source
        assert f"pipeline/data/{spec.source}.py" in stages[f"prepare_{spec.source}"]["deps"]
        assert f"train_{spec.source}" in stages and f"reports/metrics/{spec.source}.json" in stages["report"]["deps"]
