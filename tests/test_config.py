import dataclasses
import math
import re
import typing

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipeline import config
from pipeline.data import registry
from tests.conftest import CONF, compose_config


def test_defaults_compose_and_paths_are_absolute(tmp_path):
    cfg = compose_config()
    assert cfg.data.name == "toy" and cfg.model.cell == "lstm" and cfg.optimizer.name == "adam"
    assert cfg.paths.root == str(config.ROOT)
    assert cfg.tracking.uri == f"sqlite:///{config.ROOT}/mlflow.db"
    config.validate(cfg)


@pytest.mark.parametrize("group", ["model", "optimizer", "trainer", "tracking", "data"])
def test_every_group_option_composes_and_validates(group):
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))  # _common: a part
    assert options
    for option in options:
        config.validate(compose_config([f"{group}={option}"]))


def test_presets_state_only_their_differences():
    cfg = compose_config(["model=bigru"])
    assert (cfg.model.cell, cfg.model.bidirectional, cfg.model.units) == ("gru", True, 64)
    cfg = compose_config(["optimizer=sgd"])
    assert (cfg.optimizer.lr_decay, cfg.optimizer.clip_global_norm, cfg.optimizer.momentum) == (0.5, 5.0, 0.0)
    # Each optimizer has its own keys only: an SGD run logs no Adam betas.
    assert set(cfg.optimizer) == {"name", "learning_rate", "clip_global_norm", "lr_decay", "lr_decay_start", "momentum"}
    assert set(compose_config(["optimizer=adam"]).optimizer) >= {"beta_1", "beta_2", "epsilon"}
    with pytest.raises(ConfigCompositionException, match=r"optimizer\.beta_1: no such key"):
        compose_config(["optimizer=sgd", "optimizer.beta_1=0.5"])


def test_experiment_preset():
    cfg = compose_config(["experiment=toy_dynamic"])
    assert cfg.optimizer.learning_rate == 0.01 and cfg.model.units == 64


def test_misspelt_key_fails_at_compose_listing_the_valid_keys():
    # Hydra's own message suggested `+model.unitz=3`, which only adds the typo.
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["model.unitz=3"])
    assert str(err.value) == (
        "model.unitz: no such key; did you mean model.units? Valid keys of model: cell, bidirectional, layers, units, "
        "dropout, recurrent_dropout, unroll, embedding_dim, init_scale, param_budget."
    )
    assert err.value.__cause__ is None  # so Hydra prints this message alone


@pytest.mark.parametrize("top", ["config", "prepare", "report"])
def test_a_top_level_key_added_with_plus_that_no_entry_point_has_is_a_typo(top):
    with pytest.raises(config.ConfigError, match=r"^seeed: no such key at the top level(; did you mean seed\?)?"):
        config.validate(compose_config(["+seeed=7"], top), top)
    assert config.validate(compose_config(["seed=7"]), "prepare")  # a training config handed to prepare: fine


def test_an_unknown_cell_type_says_how_to_name_an_own_cell():
    with pytest.raises(config.ConfigError, match=r"'my_cell.Leaky'; choose one of rnn, .*, or package.module:Class"):
        config.validate(compose_config(["model.cell=my_cell.Leaky"]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["unitz=3"],
            "unitz: no such key. Valid keys at the top level: paths, data, model, optimizer, trainer, tracking, anchor",
        ),
        (["data=ptb", "data.max_len=5"], "data.max_len: no such key. Valid keys of data: name, source, kind, vocab"),
        (["trainer.epoch=3"], "trainer.epoch: no such key; did you mean trainer.epochs? Valid keys of trainer: epochs"),
    ],
)
def test_misspelt_keys_in_every_section_list_that_section(overrides, message):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(overrides)
    assert str(err.value).startswith(message)


def test_forced_unknown_key_fails_validation_listing_the_valid_keys():
    cfg = compose_config(["+model.unitz=3"])
    with pytest.raises(config.ConfigError, match=r"^model\.unitz: no such key; did you mean model\.units\? Valid keys"):
        config.validate(cfg)


def test_explain_unknown_key_leaves_other_errors_alone():
    assert config.explain_unknown_key("Error merging override model.units=abc") is None
    assert config.explain_unknown_key("Key 'x' not in 'SomeoneElsesConfig'") is None


def test_wrong_type_fails_at_compose():
    with pytest.raises(ConfigCompositionException, match=r"model\.units=abc"):
        compose_config(["model.units=abc"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.cell=lstn", "model.cell: unknown cell type 'lstn'; choose one of rnn, lstm, gru"),
        ("optimizer.name=adamw", "optimizer.name: unknown optimizer 'adamw'"),
        ("model.dropout=1.5", "model.dropout: must be in [0, 1), got 1.5"),
        ("optimizer.learning_rate=0", "optimizer.learning_rate: must be positive, got 0"),
        ("data.min_len=30", "data.min_len: need 1 <= data.min_len <= data.max_len, got 30"),
        ("data.pad_value=0.5", "data.pad_value: must be negative (generated values are >= 0), got 0.5"),
        # Values that a bare schema would accept silently.
        (
            "trainer.max_steps_per_epoch=-1",
            "trainer.max_steps_per_epoch: must be null or at least 1 (null = the whole training set), got -1",
        ),
        ("optimizer.beta_1=2", "optimizer.beta_1: must be in [0, 1), got 2"),
        (
            "optimizer.learning_rate=inf",
            "optimizer.learning_rate: must be positive and finite, got inf",
        ),
        ("optimizer.learning_rate=nan", "optimizer.learning_rate: must be positive and finite, got nan"),
        ("trainer.generate_words=-1", "trainer.generate_words: must be at least 0 (0 = no samples), got -1"),
        # Values that would otherwise end in a traceback (or a TensorFlow abort).
        (
            "seed=-1",
            "seed: must be in [0, 4294967295] (NumPy and Keras seeds are unsigned 32-bit), got -1",
        ),
        ("trainer.bptt_steps=0", "trainer.bptt_steps: must be at least 1, got 0"),
        ("optimizer=sgd optimizer.momentum=-5", "optimizer.momentum: must be in [0, 1), got -5"),
        (
            "trainer.intra_op_threads=-2",
            "trainer.intra_op_threads: must be at least 0 (0 = TensorFlow's choice), got -2",
        ),
        (
            "trainer.verbose=3",
            "trainer.verbose: must be in [0, 2] (1 = a progress bar on a terminal; 0 or 2 = one line per epoch)",
        ),
        ("model.init_scale=0", "model.init_scale: must be null or positive (null = Keras' initialisers), got 0"),
        ("optimizer.clip_global_norm=inf", "optimizer.clip_global_norm: must be null or positive and finite"),
        ("data.kind=language_model", "data.kind: toy is a classification dataset, got 'language_model'"),
        ("data.name=../x", "data.name: names the folder data/prepared/<name>"),
        # The speed settings.
        ("trainer.precision=half", "trainer.precision: unknown precision 'half'"),
        ("trainer.steps_per_execution=0", "trainer.steps_per_execution: must be at least 1"),
        ("trainer.jit_compile=true", "trainer.jit_compile: Keras turns XLA off while TF's op determinism is on"),
    ],
)
def test_bad_values_are_named_with_the_fix(override, message):
    with pytest.raises(config.ConfigError) as err:
        config.validate(compose_config(override.split()))
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=ptb", "trainer.bptt_steps=0"], "trainer.bptt_steps: must be at least 1, got 0"),
        (["data=ptb", "data.vocab_size=2"], "data.vocab_size: must be at least 3 (<eos>, <unk> and a word), got 2"),
        (["data=imdb", "data.truncate=middle"], "data.truncate: unknown truncation 'middle'; choose one of pre, post"),
        (["data=imdb", "data.val_size=25000"], "data.val_size: must be in [1, 24999] (out of 25,000 training reviews)"),
        (["data=mnist", "data.seed=-1"], "data.seed: must be in [0, 4294967295]"),
    ],
)
def test_dataset_values_are_checked_per_dataset(overrides, message):
    with pytest.raises(config.ConfigError) as err:
        config.validate(compose_config(overrides))
    assert str(err.value).startswith(message)


def numeric_fields(schema: type, prefix: str = "") -> dict[str, set[type]]:
    """The dotted key of every int or float field (nullable or not) below ``schema``, with its types."""
    found = {}
    for name, kind in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(kind):
            found |= numeric_fields(kind, f"{prefix}{name}.")
        elif {int, float} & set(typing.get_args(kind) or [kind]):
            found[prefix + name] = set(typing.get_args(kind) or [kind])
    return found


def test_every_numeric_key_has_a_range():
    tops = {
        k: v
        for top in config.TOP_SCHEMAS.values()
        if top is not config.GenerateConfig
        for k, v in numeric_fields(top).items()
    }
    for schema in config.OPTIMIZER_SCHEMAS.values():
        tops |= numeric_fields(schema, "optimizer.")
    assert set(tops) == set(config.BOUNDS)
    for spec in registry.specs():
        assert set(numeric_fields(spec.schema)) == set(spec.bounds), spec.source
    assert set(numeric_fields(config.GenerateConfig)) == set(config.GENERATE_BOUNDS)


def out_of_range(bound: config.Bound, types: set[type]) -> list[float]:
    """Values just outside ``bound`` at each end, and infinity where the type allows it."""
    values = [math.inf] if float in types else []
    if bound.low is not None:
        values.append(bound.low if bound.low_open else bound.low - 1)
    if bound.high is not None:
        values.append(bound.high if bound.high_open else bound.high + 1)
    return values


@pytest.mark.parametrize(
    ("source", "optimizer", "section"),
    [
        ("toy", "adam", ""),  # every section
        *[(source, "adam", "data.") for source in registry.sources() if source != "toy"],  # each dataset's own keys
        *[("toy", name, "optimizer.") for name in ("sgd", "rmsprop")],  # each optimizer's own keys
    ],
)
def test_every_range_refuses_the_values_outside_it(source, optimizer, section):
    composed = compose_config([f"data={source}", f"optimizer={optimizer}"])
    config.validate(composed)  # the defaults are inside every range
    spec = registry.get(source)
    types = {**numeric_fields(config.Config), **numeric_fields(spec.schema, "data.")}
    types |= numeric_fields(config.OPTIMIZER_SCHEMAS[optimizer], "optimizer.")
    checked = []
    for key, bound in {**config.BOUNDS, **{f"data.{k}": b for k, b in spec.bounds.items()}}.items():
        if key not in types or not key.startswith(section):  # another entry point's or optimizer's key
            continue
        for value in out_of_range(bound, types[key]):
            cfg = composed.copy()
            OmegaConf.update(cfg, key, value)
            with pytest.raises(config.ConfigError, match=rf"^{re.escape(key)}: must be .*, got "):
                config.validate(cfg)
        checked.append(key)
    assert checked and set(checked) == {key for key in types if key.startswith(section)}  # none without a range


def test_every_dataset_and_optimizer_has_its_ranges_checked():
    cases = test_every_range_refuses_the_values_outside_it.pytestmark[0].args[1]
    assert {source for source, _, _ in cases} == set(registry.sources())
    assert {optimizer for _, optimizer, _ in cases} == set(config.OPTIMIZER_SCHEMAS)


def test_prepared_data_must_match_the_data_overrides():
    built_with = dict(OmegaConf.to_container(compose_config(["data=ptb"]).data))
    config.check_prepared(compose_config(["data=ptb"]).data, built_with)  # the same: fine
    config.check_prepared(compose_config(["data=ptb", "data.vocab_size=10000"]).data, built_with)
    with pytest.raises(config.ConfigError) as err:
        config.check_prepared(compose_config(["data=ptb", "data.vocab_size=5000"]).data, built_with)
    assert str(err.value) == (
        "data.vocab_size=5000 (prepared with 10000): the prepared data/prepared/ptb was built otherwise, and training "
        "would ignore the override. Prepare it first: `python -m pipeline.prepare data=ptb data.vocab_size=5000` (add "
        "data.name=<new name> to both commands to keep the default prepared data), or drop the override."
    )
    toy = dict(OmegaConf.to_container(compose_config().data))
    with pytest.raises(config.ConfigError, match=r"^data\.n_train=10 \(prepared with 1000\), data\.seed=7 \(prepa"):
        config.check_prepared(compose_config(["data.n_train=10", "data.seed=7"]).data, toy)
    del toy["seed"]  # prepared before the key existed
    with pytest.raises(config.ConfigError, match=r"^data\.seed=1234 \(prepared with none\)"):
        config.check_prepared(compose_config().data, toy)


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
