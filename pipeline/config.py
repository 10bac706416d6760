"""Config schema and validation.

Hydra composes ``conf/``; the dataclasses below are registered as its schema so that a misspelt key or a value of the
wrong type fails when the config is composed, with the full key named (and, for a misspelt key, the valid keys of its
section listed). ``validate`` adds the checks a type cannot express, from the tables ``BOUNDS`` and ``CHOICES`` (a
cell name from a fixed set, a positive size, a rate in [0, 1)), and says how to fix each problem.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ROOT = Path(__file__).resolve().parents[1]
"""The checkout this package lives in: every default path hangs off it, never off the working directory."""

CELLS = ("rnn", "lstm", "gru")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
TRUNCATE = ("pre", "post")
PRECISIONS = ("float32", "bfloat16_grad", "bfloat16_output", "mixed_bfloat16", "mixed_float16", "auto")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


@dataclass
class PathsConfig:
    root: str = MISSING
    data: str = MISSING
    reports: str = MISSING
    models: str = MISSING
    checkpoints: str = MISSING


@dataclass
class DownloadConfig:
    mirror: str | None = None
    timeout: float = 30.0


@dataclass
class ToyDataConfig:
    name: str = "toy"
    source: str = "toy"
    kind: str = "classification"
    min_len: int = 3
    max_len: int = 20
    max_value: int = 1000
    n_train: int = 1000
    n_val: int = 200
    n_test: int = 500
    pad_value: float = -1.0
    seed: int = 1234


@dataclass
class PTBDataConfig:
    name: str = "ptb"
    source: str = "ptb"
    kind: str = "language_model"
    vocab_size: int = 10_000


@dataclass
class IMDBDataConfig:
    name: str = "imdb"
    source: str = "imdb"
    kind: str = "classification"
    vocab_size: int = 10_000
    max_len: int = 80
    truncate: str = "pre"
    standardize: str = "lower_and_strip_punctuation"
    val_size: int = 2_500
    seed: int = 1234


@dataclass
class MNISTDataConfig:
    name: str = "mnist"
    source: str = "mnist"
    kind: str = "classification"
    val_size: int = 5_000
    seed: int = 1234


@dataclass
class ModelConfig:
    cell: str = "lstm"
    bidirectional: bool = False
    layers: int = 1
    units: int = 64
    dropout: float = 0.0
    recurrent_dropout: float = 0.0
    unroll: bool = False
    embedding_dim: int | None = None
    init_scale: float | None = None


@dataclass
class OptimizerConfig:
    name: str = "adam"
    learning_rate: float = 1e-3
    clip_global_norm: float | None = None
    lr_decay: float = 1.0
    lr_decay_start: int = 0
    momentum: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.999
    rho: float = 0.9
    epsilon: float = 1e-7


@dataclass
class TrainerConfig:
    epochs: int = 30
    max_epochs: int | None = None
    batch_size: int = 32
    bptt_steps: int = 35
    max_steps_per_epoch: int | None = None
    max_eval_batches: int | None = None
    early_stopping_patience: int | None = None
    deterministic: bool = True
    jit_compile: bool = False
    precision: str = "float32"
    steps_per_execution: int = 10
    distribute: bool = False
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    verbose: int = 2
    checkpoint: bool = True
    resume: bool = False
    resume_run_id: str | None = None
    generate_words: int = 20
    divergence_factor: float | None = 10.0


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = MISSING
    artifact_location: str | None = MISSING
    experiment: str = MISSING
    run_name: str | None = None
    sweep_name: str | None = None
    log_model: bool = True
    connect_timeout: float = 5.0
    http_retries: int = 2
    http_timeout: float = 15.0


@dataclass
class GenerateConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run_id: str | None = None
    model_uri: str | None = None
    prime: str = "the company said"
    words: int = 30
    strategy: str = "sample"
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0


@dataclass
class ReportConfig:
    experiments: str = "rnnlab-%"
    include_capped: bool = False


@dataclass
class BenchConfig:
    cases: list[str] = field(
        default_factory=lambda: ["ptb_small_lstm", "ptb_small_lstm_float32", "imdb_lstm", "mnist_lstm"]
    )
    steps: int = 100
    rounds: int = 5
    pipeline_overheads: bool = True


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    data: Any = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    seed: int = 42
    export: bool = False


# data.source -> its schema. data.name may differ (a variant such as imdb_long gets its own prepared folder).
DATA_SCHEMAS: dict[str, type] = {
    "toy": ToyDataConfig,
    "ptb": PTBDataConfig,
    "imdb": IMDBDataConfig,
    "mnist": MNISTDataConfig,
}


def register() -> None:
    """Register the schema with Hydra and the `rnnlab.root` resolver with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver("rnnlab.root"):
        OmegaConf.register_new_resolver("rnnlab.root", lambda: os.environ.get("RNNLAB_ROOT", str(ROOT)))
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(name="generate_schema", node=GenerateConfig)
    for name, schema in DATA_SCHEMAS.items():
        cs.store(group="data", name=f"{name}_schema", node=schema)
    _explain_unknown_overrides()


RUNTIME_KEYS = ("trainer.resume", "trainer.resume_run_id", "trainer.verbose", "tracking.run_name")


def fingerprint(cfg: DictConfig) -> str:
    """sha256 of the resolved config minus the keys that do not change results (verbosity, resume switches): two
    runs with the same fingerprint train the same model, so one may resume the other."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for dotted in RUNTIME_KEYS:
        section, key = dotted.split(".")
        resolved.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Bound:
    """The values one numeric key may take: from ``low`` to ``high`` (either end open or absent), always finite,
    null only when ``nullable``; ``note`` says what a special value means."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False
    note: str = ""

    def admits(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        """The range in words: ``in [0, 1)``, ``at least 1``, ``positive``, ``null or at least 1``."""
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            text = f"in {'(' if self.low_open else '['}{_num(lo)}, {_num(hi)}{')' if self.high_open else ']'}"
        elif lo is not None:
            text = ("positive" if lo == 0 else f"greater than {_num(lo)}") if self.low_open else f"at least {_num(lo)}"
        else:
            text = ("negative" if hi == 0 else f"less than {_num(hi)}") if self.high_open else f"at most {_num(hi)}"
        return f"null or {text}" if self.nullable else text


SEED_MAX = 2**32 - 1
COUNT = Bound(1)
FRACTION = Bound(0, 1, high_open=True)  # a dropout rate or a moving-average decay
POSITIVE = Bound(0, low_open=True)
SEED = Bound(0, SEED_MAX, note=" (NumPy and Keras seeds are unsigned 32-bit)")


def _cap(meaning: str) -> Bound:
    return Bound(1, nullable=True, note=f" (null = {meaning})")


# Every numeric key of the schema (tests/test_config.py checks that none is left out): its valid values.
BOUNDS: dict[str, Bound] = {
    "seed": SEED,
    "download.timeout": POSITIVE,
    "model.layers": COUNT,
    "model.units": COUNT,
    "model.dropout": FRACTION,
    "model.recurrent_dropout": FRACTION,
    "model.embedding_dim": Bound(1, nullable=True, note=" (null = units for tokens, none for real values)"),
    "model.init_scale": Bound(0, low_open=True, nullable=True, note=" (null = Keras' initialisers)"),
    "optimizer.learning_rate": POSITIVE,
    "optimizer.clip_global_norm": Bound(0, low_open=True, nullable=True, note=" (null = no clipping)"),
    "optimizer.lr_decay": Bound(0, 1, low_open=True, note=" (1 = constant)"),
    "optimizer.lr_decay_start": Bound(0),
    "optimizer.momentum": FRACTION,
    "optimizer.beta_1": FRACTION,
    "optimizer.beta_2": FRACTION,
    "optimizer.rho": FRACTION,
    "optimizer.epsilon": POSITIVE,
    "trainer.epochs": COUNT,
    "trainer.max_epochs": _cap("no cap"),
    "trainer.batch_size": COUNT,
    "trainer.bptt_steps": COUNT,
    "trainer.max_steps_per_epoch": _cap("the whole training set"),
    "trainer.max_eval_batches": _cap("the whole split"),
    "trainer.early_stopping_patience": _cap("never stop early"),
    "trainer.steps_per_execution": COUNT,
    "trainer.intra_op_threads": Bound(0, note=" (0 = TensorFlow's choice)"),
    "trainer.inter_op_threads": Bound(0, note=" (0 = TensorFlow's choice)"),
    "trainer.verbose": Bound(0, 2, note=" (1 = a progress bar; 0 or 2 = one line per epoch)"),
    "trainer.generate_words": Bound(0, note=" (0 = no samples)"),
    "trainer.divergence_factor": Bound(1, low_open=True, nullable=True, note=" (null = never stop)"),
    "tracking.connect_timeout": POSITIVE,
    "tracking.http_retries": Bound(0),
    "tracking.http_timeout": Bound(1, note=" (whole seconds)"),
    "bench.steps": COUNT,
    "bench.rounds": COUNT,
}
DATA_BOUNDS: dict[str, dict[str, Bound]] = {
    "toy": {
        "data.min_len": COUNT,
        "data.max_len": COUNT,
        "data.max_value": COUNT,
        "data.n_train": COUNT,
        "data.n_val": COUNT,
        "data.n_test": COUNT,
        "data.pad_value": Bound(high=0, high_open=True, note=" (generated values are >= 0)"),
        "data.seed": SEED,
    },
    "ptb": {"data.vocab_size": Bound(3, note=" (<eos>, <unk> and a word)")},
    "imdb": {
        "data.vocab_size": Bound(3, note=" (padding, out-of-vocabulary and a word)"),
        "data.max_len": COUNT,
        "data.val_size": Bound(1, 24_999, note=" (out of 25,000 training reviews)"),
        "data.seed": SEED,
    },
    "mnist": {"data.val_size": Bound(1, 59_999, note=" (out of 60,000 training images)"), "data.seed": SEED},
}
GENERATE_BOUNDS: dict[str, Bound] = {
    "words": COUNT,
    "temperature": Bound(0, note=" (0 = greedy: always the likeliest word)"),
    "top_k": Bound(0, note=" (0 = all words)"),
    "seed": SEED,
    **{key: bound for key, bound in BOUNDS.items() if key.startswith("tracking.")},
}
STANDARDIZE = ("lower_and_strip_punctuation", "lower", "strip_punctuation")
STRATEGIES = ("greedy", "sample")
# Keys with a fixed set of values: (what a value is called, the choices).
CHOICES: dict[str, tuple[str, tuple[str, ...]]] = {
    "model.cell": ("cell type", CELLS),
    "optimizer.name": ("optimizer", OPTIMIZERS),
    "trainer.precision": ("precision", PRECISIONS),
}
DATA_CHOICES: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "imdb": {"data.truncate": ("truncation", TRUNCATE), "data.standardize": ("standardisation", STANDARDIZE)},
}
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # data.name names a folder: one path component


def _override(value: Any) -> str:
    """``value`` as it is written on Hydra's command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return _num(value) if isinstance(value, int | float) and math.isfinite(value) else str(value)


def _check_table(
    cfg: DictConfig,
    defaults: DictConfig,
    bounds: Mapping[str, Bound],
    choices: Mapping[str, tuple[str, tuple[str, ...]]],
) -> None:
    """Each key of ``bounds`` in its range and each key of ``choices`` one of its values; the message names the
    key, the value, the valid values and an example that works (the schema's default)."""
    for key, bound in bounds.items():
        value = OmegaConf.select(cfg, key)
        if not bound.admits(value):
            finite = " and finite" if isinstance(value, float) and not math.isfinite(value) else ""
            example = _override(OmegaConf.select(defaults, key))
            raise ConfigError(
                f"{key}: must be {bound.describe()}{finite}{bound.note}, got {_override(value)}; "
                f"e.g. {key}={example} (the default)"
            )
    for key, (noun, allowed) in choices.items():
        value = OmegaConf.select(cfg, key)
        _check(value in allowed, key, f"unknown {noun} {value!r}; choose one of {', '.join(allowed)}")


def _check_schema(cfg: DictConfig, schema: DictConfig, resolve: bool = True) -> None:
    """Re-check the whole tree against the schema: ``+key=value`` overrides and Hydra's open data node skip it."""
    try:
        OmegaConf.merge(schema, OmegaConf.to_container(cfg, resolve=resolve))
    except OmegaConfBaseException as err:  # several error types, each naming the full key
        raise ConfigError(explain_unknown_key(str(err)) or f"invalid config: {err}") from err


def validate(cfg: DictConfig) -> DictConfig:
    """Fail early, naming the key, its value and the valid ones, on values the schema types cannot rule out."""
    source = cfg.data.get("source")
    _check(source in DATA_SCHEMAS, "data.source", f"unknown dataset {source!r}; choose one of {tuple(DATA_SCHEMAS)}")
    schema = OmegaConf.structured(Config)
    schema.data = OmegaConf.structured(DATA_SCHEMAS[source])
    _check_schema(cfg, schema)
    bounds, choices = {**BOUNDS, **DATA_BOUNDS[source]}, {**CHOICES, **DATA_CHOICES.get(source, {})}
    _check_table(cfg, schema, bounds, choices)
    d, t = cfg.data, cfg.trainer
    kind = schema.data.kind
    _check(d.kind == kind, "data.kind", f"{source} is a {kind} dataset, got {d.kind!r}; drop the override")
    _check(
        bool(NAME.fullmatch(d.name)),
        "data.name",
        f"names the folder data/prepared/<name>: letters, digits, '_', '-' and '.' only, got {d.name!r}",
    )
    for key in ("tracking.uri", "tracking.experiment", "report.experiments"):
        _check(bool(OmegaConf.select(cfg, key)), key, "must not be empty")
    _check(len(cfg.bench.cases) >= 1, "bench.cases", "name at least one case")
    _check(
        not (t.jit_compile and t.deterministic),
        "trainer.jit_compile",
        "Keras turns XLA off while TF's op determinism is on; also set trainer.deterministic=false",
    )
    if source == "toy":
        _check(d.min_len <= d.max_len, "data.min_len", f"need 1 <= data.min_len <= data.max_len, got {d.min_len}")
        _check(d.max_value > d.max_len, "data.max_value", "must exceed data.max_len so that a linear run fits")
    return cfg


def validate_generate(cfg: DictConfig) -> DictConfig:
    """The generate config's checks (``conf/generate.yaml``); the vocabulary bound of ``top_k`` is checked once
    the run's vocabulary is loaded."""
    defaults = OmegaConf.structured(GenerateConfig)
    _check_schema(cfg, defaults, resolve=False)  # tracking.experiment names a dataset that generate has not
    _check_table(cfg, defaults, GENERATE_BOUNDS, {"strategy": ("strategy", STRATEGIES)})
    _check(
        bool(cfg.run_id or cfg.model_uri),
        "run_id",
        "name the trained model: run_id=<MLflow run id> or model_uri=runs:/<id>/model",
    )
    _check(bool(cfg.tracking.uri), "tracking.uri", "must not be empty")
    return cfg


SCHEMAS: dict[str, type] = {
    schema.__name__: schema
    for schema in (
        Config,
        GenerateConfig,
        PathsConfig,
        DownloadConfig,
        ModelConfig,
        OptimizerConfig,
        TrainerConfig,
        TrackingConfig,
        ReportConfig,
        BenchConfig,
        *DATA_SCHEMAS.values(),
    )
}
_NOT_IN = re.compile(r"Key '(?P<key>[^']+)' not in '(?P<schema>\w+)'")
_FULL_KEY = re.compile(r"full_key: (?P<key>\S+)")
_OVERRIDE = re.compile(r"Could not override '(?P<key>[^']+)'")


def explain_unknown_key(message: str) -> str | None:
    """For Hydra's or OmegaConf's error about a key the schema lacks (``model.unitz=3``): a message that names it,
    guesses the key meant and lists the valid keys of its section. None when ``message`` is about anything else."""
    found = _NOT_IN.search(message)
    schema = SCHEMAS.get(found["schema"]) if found else None
    if schema is None:
        return None
    full = _FULL_KEY.search(message)
    full_key = full["key"] if full else found["key"]
    override = _OVERRIDE.search(message)
    asked = override["key"] if override else full_key
    section = full_key.rpartition(".")[0]
    names = [f.name for f in fields(schema)]
    close = difflib.get_close_matches(found["key"], names, n=1)
    guess = f"; did you mean {'.'.join([*filter(None, [section]), close[0]])}?" if close else "."
    where = f"of {section}" if section else "at the top level"
    what = "no such key" if asked == full_key else f"no key {found['key']!r} {where}"
    return f"{asked}: {what}{guess} Valid keys {where}: {', '.join(names)}."


def _explain_unknown_overrides() -> None:
    """Make the compose error for a misspelt override (``model.unitz=3``) list the valid keys: Hydra's own message
    suggests ``+model.unitz=3``, which only adds the typo. Hydra has no hook for it, so wrap the (private) method
    that raises it; were it renamed by an upgrade, Hydra's message would stand (tests/test_config.py notices)."""
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
    except ImportError:
        return
    original = getattr(ConfigLoaderImpl, "_apply_overrides_to_config", None)
    if original is None or getattr(original, "explains_unknown_keys", False):
        return

    def apply(overrides: Any, cfg: DictConfig) -> None:
        try:
            original(overrides, cfg)
        except ConfigCompositionException as err:
            hint = explain_unknown_key(f"{err}\n{err.__cause__ or ''}")
            if hint is None:
                raise
            raise ConfigCompositionException(hint) from None

    apply.explains_unknown_keys = True
    ConfigLoaderImpl._apply_overrides_to_config = staticmethod(apply)


def check_prepared(cfg_data: DictConfig, built_with: Mapping[str, Any]) -> None:
    """Refuse ``data.*`` values that differ from those the prepared dataset was built with (``built_with``, as
    recorded by prepare): training reads the prepared arrays, so such an override would be ignored, yet logged
    as a param of the run."""
    wanted = OmegaConf.to_container(cfg_data, resolve=True)
    differ = {key: value for key, value in wanted.items() if key not in built_with or built_with[key] != value}
    if not differ:
        return
    was = ", ".join(
        f"data.{key}={_override(value)} (prepared with {_override(built_with[key]) if key in built_with else 'none'})"
        for key, value in differ.items()
    )
    overrides = " ".join(f"data.{key}={_override(value)}" for key, value in differ.items())
    name = cfg_data.name
    raise ConfigError(
        f"{was}: the prepared data/prepared/{name} was built otherwise, and training would ignore the "
        f"override. Prepare it first: `python -m pipeline.prepare data={name} {overrides}` (add data.name=<new name> "
        "to both commands to keep the default prepared data), or drop the override."
    )
