"""Config schema and validation.

Hydra composes ``conf/``; the dataclasses below are registered as its schema so that a misspelt key or a value of the
wrong type fails when the config is composed, with the full key named. ``validate`` adds the checks a type cannot
express (a cell name from a fixed set, a positive size) and says how to fix each problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

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


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = MISSING
    artifact_location: str | None = MISSING
    experiment: str = MISSING
    run_name: str | None = None
    sweep_name: str | None = None
    log_model: bool = True


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


def validate(cfg: DictConfig) -> DictConfig:
    """Fail early, naming the key, on values the schema types cannot rule out."""
    source = cfg.data.get("source")
    _check(source in DATA_SCHEMAS, "data.source", f"unknown dataset {source!r}; choose one of {tuple(DATA_SCHEMAS)}")
    # Re-check the whole tree against the schema: `+key=value` overrides and Hydra's open data node skip it.
    schema = OmegaConf.structured(Config)
    schema.data = OmegaConf.structured(DATA_SCHEMAS[source])
    try:
        OmegaConf.merge(schema, OmegaConf.to_container(cfg, resolve=True))
    except Exception as err:  # omegaconf raises several error types, each naming the full key
        raise ConfigError(f"invalid config: {err}") from err
    m, o, t = cfg.model, cfg.optimizer, cfg.trainer
    _check(m.cell in CELLS, "model.cell", f"unknown cell type {m.cell!r}; choose one of {', '.join(CELLS)}")
    _check(m.layers >= 1, "model.layers", f"must be at least 1, got {m.layers}")
    _check(m.units >= 1, "model.units", f"must be at least 1, got {m.units}")
    for key in ("dropout", "recurrent_dropout"):
        _check(0.0 <= m[key] < 1.0, f"model.{key}", f"must be in [0, 1), got {m[key]}")
    _check(
        m.embedding_dim is None or m.embedding_dim >= 1,
        "model.embedding_dim",
        "must be null or a positive size",
    )
    _check(o.name in OPTIMIZERS, "optimizer.name", f"unknown optimizer {o.name!r}; choose one of {OPTIMIZERS}")
    _check(o.learning_rate > 0, "optimizer.learning_rate", f"must be positive, got {o.learning_rate}")
    _check(
        o.clip_global_norm is None or o.clip_global_norm > 0,
        "optimizer.clip_global_norm",
        "must be null (no clipping) or a positive norm",
    )
    _check(0 < o.lr_decay <= 1, "optimizer.lr_decay", f"must be in (0, 1], got {o.lr_decay}")
    _check(t.epochs >= 1, "trainer.epochs", f"must be at least 1, got {t.epochs}")
    _check(t.max_epochs is None or t.max_epochs >= 1, "trainer.max_epochs", "must be null (no cap) or at least 1")
    _check(t.batch_size >= 1, "trainer.batch_size", f"must be at least 1, got {t.batch_size}")
    _check(
        t.precision in PRECISIONS, "trainer.precision", f"unknown precision {t.precision!r}; choose one of {PRECISIONS}"
    )
    _check(
        t.steps_per_execution >= 1, "trainer.steps_per_execution", f"must be at least 1, got {t.steps_per_execution}"
    )
    _check(
        not (t.jit_compile and t.deterministic),
        "trainer.jit_compile",
        "Keras turns XLA off while TF's op determinism is on; also set trainer.deterministic=false",
    )
    d = cfg.data
    if source in ("imdb", "mnist"):
        _check(d.val_size >= 1, "data.val_size", f"must be at least 1, got {d.val_size}")
    if source in ("imdb", "ptb"):
        _check(d.vocab_size >= 3, "data.vocab_size", f"must be at least 3, got {d.vocab_size}")
    if source == "imdb":
        _check(d.max_len >= 1, "data.max_len", f"must be at least 1, got {d.max_len}")
        _check(d.truncate in TRUNCATE, "data.truncate", f"must be 'pre' (keep the end) or 'post', got {d.truncate!r}")
    if source == "toy":
        _check(1 <= d.min_len <= d.max_len, "data.min_len", "need 1 <= data.min_len <= data.max_len")
        _check(d.max_value > d.max_len, "data.max_value", "must exceed data.max_len so that a linear run fits")
        _check(d.pad_value < 0, "data.pad_value", "must be negative: generated values are >= 0")
    return cfg
