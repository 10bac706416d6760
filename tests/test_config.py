import re

import pytest
from hydra.errors import ConfigCompositionException

from pipeline import config
from tests.conftest import CONF, compose_config


def test_defaults_compose_and_paths_are_absolute(tmp_path):
    cfg = compose_config()
    assert cfg.data.name == "toy" and cfg.model.cell == "lstm" and cfg.optimizer.name == "adam"
    assert cfg.paths.root == str(config.ROOT)
    assert cfg.tracking.uri == f"sqlite:///{config.ROOT}/mlflow.db"
    config.validate(cfg)


@pytest.mark.parametrize("group", ["model", "optimizer", "trainer", "tracking", "data"])
def test_every_group_option_composes_and_validates(group):
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert options
    for option in options:
        config.validate(compose_config([f"{group}={option}"]))


def test_presets_state_only_their_differences():
    cfg = compose_config(["model=bigru"])
    assert (cfg.model.cell, cfg.model.bidirectional, cfg.model.units) == ("gru", True, 64)
    cfg = compose_config(["optimizer=sgd"])
    assert (cfg.optimizer.lr_decay, cfg.optimizer.clip_global_norm, cfg.optimizer.beta_1) == (0.5, 5.0, 0.9)


def test_experiment_preset():
    cfg = compose_config(["+experiment=toy_dynamic"])
    assert cfg.optimizer.learning_rate == 0.01 and cfg.model.units == 64


def test_misspelt_key_fails_at_compose_with_the_key_named():
    with pytest.raises(ConfigCompositionException, match=r"model\.unitz"):
        compose_config(["model.unitz=3"])


def test_forced_unknown_key_fails_validation_with_the_key_named():
    cfg = compose_config(["+model.unitz=3"])
    with pytest.raises(config.ConfigError, match=r"unitz"):
        config.validate(cfg)


def test_wrong_type_fails_at_compose():
    with pytest.raises(ConfigCompositionException, match=r"model\.units=abc"):
        compose_config(["model.units=abc"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.cell=lstn", "model.cell: unknown cell type 'lstn'; choose one of rnn, lstm, gru"),
        ("optimizer.name=adamw", "optimizer.name: unknown optimizer 'adamw'"),
        ("model.dropout=1.5", "model.dropout: must be in [0, 1)"),
        ("optimizer.learning_rate=0", "optimizer.learning_rate: must be positive"),
        ("data.min_len=30", "data.min_len: need 1 <= data.min_len <= data.max_len"),
        ("data.pad_value=0.5", "data.pad_value: must be negative"),
    ],
)
def test_bad_values_are_named_with_the_fix(override, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.validate(compose_config([override]))


def test_every_config_value_has_a_comment():
    missing = []
    for path in CONF.rglob("*.yaml"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", "-")) or stripped.endswith(":"):
                continue  # comments, defaults-list items and section headers
            if "#" not in line:
                missing.append(f"{path.relative_to(CONF)}:{number}: {stripped}")
    assert not missing, "config values without a comment:\n" + "\n".join(missing)


@pytest.mark.parametrize(
    "launcher,target",
    [("parallel", "JoblibLauncher"), ("slurm", "SlurmLauncher"), ("basic", "BasicLauncher")],
)
def test_launcher_configs_compose(launcher, target):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)


def test_server_tracking_reads_its_uri_from_the_environment(monkeypatch):
    monkeypatch.setenv("RNNLAB_TRACKING_URI", "http://127.0.0.1:5999")
    cfg = compose_config(["tracking=server"])
    assert cfg.tracking.uri == "http://127.0.0.1:5999" and cfg.tracking.artifact_location is None
    config.validate(cfg)
