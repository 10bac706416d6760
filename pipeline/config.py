"""Config schema and validation.

Hydra composes ``conf/``; the dataclasses below are registered as its schema so that a misspelt key or a value of the
wrong type fails when the config is composed, with the full key named (and, for a misspelt key, the valid keys of its
section listed). ``validate`` adds the checks a type cannot express, from the tables ``BOUNDS`` and ``CHOICES`` (a
cell name from a fixed set, a positive size, a rate in [0, 1)), and says how to fix each problem. Each dataset's
schema, ranges and checks are declared in its own module and read from ``pipeline.data.registry``.
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

from pipeline import cells, objective, sampling
from pipeline.data import registry
from pipeline.schema import (  # re-exported: config.ConfigError, config.Bound, ... are what other modules name
    COUNT,
    FRACTION,
    POSITIVE,
    SEED,
    Bound,
    ConfigError,
    DataConfig,
    plain_number,
)
from pipeline.schema import require as _check

ROOT = Path(__file__).resolve().parents[1]
"""The checkout this package lives in: every default path hangs off it, never off the working directory."""

OPTIMIZERS = ("sgd", "adam", "rmsprop")
PRECISIONS = ("float32", "bfloat16_grad", "bfloat16_output", "mixed_bfloat16", "mixed_float16", "auto")


# The schema holds types only: every value lives in conf/ (one place), so a default cannot drift between the two.


@dataclass
class PathsConfig:
    root: str = MISSING
    data: str = MISSING
    reports: str = MISSING
    models: str = MISSING
    checkpoints: str = MISSING


@dataclass
class DownloadConfig:
    mirror: str | None = MISSING
    timeout: float = MISSING


@dataclass
class ModelConfig:
    cell: str = MISSING
    bidirectional: bool = MISSING
    layers: int = MISSING
    units: int = MISSING
    dropout: float = MISSING
    recurrent_dropout: float = MISSING
    unroll: bool = MISSING
    embedding_dim: int | None = MISSING
    init_scale: float | None = MISSING
    param_budget: int | None = MISSING


@dataclass
class OptimizerConfig:
    """What every optimizer has; each one adds its own keys (and logs only those)."""

    name: str = MISSING
    learning_rate: float = MISSING
    clip_global_norm: float | None = MISSING
    lr_decay: float = MISSING
    lr_decay_start: int = MISSING


@dataclass
class SGDConfig(OptimizerConfig):
    momentum: float = MISSING


@dataclass
class AdamConfig(OptimizerConfig):
    beta_1: float = MISSING
    beta_2: float = MISSING
    epsilon: float = MISSING


@dataclass
class RMSpropConfig(OptimizerConfig):
    rho: float = MISSING
    momentum: float = MISSING
    epsilon: float = MISSING


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    bptt_steps: int = MISSING
    max_steps_per_epoch: int | None = MISSING
    max_eval_batches: int | None = MISSING
    early_stopping_patience: int | None = MISSING
    deterministic: bool = MISSING
    jit_compile: bool = MISSING
    precision: str = MISSING
    kernels: str = MISSING
    wavefront: bool = MISSING
    steps_per_execution: int = MISSING
    distribute: bool = MISSING
    intra_op_threads: int = MISSING
    inter_op_threads: int = MISSING
    verbose: int = MISSING
    checkpoint: bool = MISSING
    resume: bool = MISSING
    resume_run_id: str | None = MISSING
    generate_words: int = MISSING
    divergence_factor: float | None = MISSING
    compile_cache: str | None = MISSING


@dataclass
class AnchorConfig:
    """A preset's published result, shown beside the measured one in the report."""

    metric: str | None = MISSING
    value: float | None = MISSING
    source: str | None = MISSING
    url: str | None = None


@dataclass
class SweepConfig:
    resume: str = MISSING


@dataclass
class SearchConfig:
    storage: str = MISSING
    pruner: str = MISSING
    warmup_epochs: int = MISSING
    startup_trials: int = MISSING
    study: str | None = MISSING
    trial: int | None = MISSING


@dataclass
class TrackingConfig:
    enabled: bool = MISSING
    uri: str = MISSING
    artifact_location: str | None = MISSING
    experiment: str = MISSING
    run_name: str | None = MISSING
    sweep_name: str | None = MISSING
    log_model: bool = MISSING
    connect_timeout: float = MISSING
    http_retries: int = MISSING
    http_timeout: float = MISSING


@dataclass
class ReportConfig:
    experiments: str = MISSING
    include_capped: bool = MISSING


@dataclass
class BenchConfig:
    cases: list[str] = MISSING
    steps: int = MISSING
    rounds: int = MISSING
    pipeline_overheads: bool = MISSING
    isa: list[str] = MISSING
    whole_run_steps: int | None = MISSING
    whole_run_repeats: int = MISSING
    whole_run_cases: list[str] | None = MISSING
    results_to: str | None = MISSING


@dataclass
class ProfileConfig:
    case: str = MISSING
    steps: int = MISSING


# One top-level config per entry point (conf/<name>.yaml), each holding only what it reads.


@dataclass
class Config:
    """Training (conf/config.yaml)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    data: Any = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    seed: int = MISSING
    export: bool = MISSING


@dataclass
class DownloadTop:
    """The download stage (conf/download.yaml)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    data: Any = MISSING
    download: DownloadConfig = field(default_factory=DownloadConfig)


@dataclass
class PrepareTop:
    """The prepare stage (conf/prepare.yaml)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    data: Any = MISSING


@dataclass
class ReportTop:
    """The report stage (conf/report.yaml)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


@dataclass
class BenchTop:
    """The benchmark (conf/bench.yaml)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


@dataclass
class ProfileTop:
    """The profile (conf/profile.yaml)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


@dataclass
class StudyConfig:
    """One published study: what it shows and the training commands that produce it."""

    title: str = MISSING
    runs: list[str] = MISSING


@dataclass
class ResultsConfig:
    dir: str = MISSING
    study: str | None = MISSING
    train: bool = MISSING


@dataclass
class ResultsTop:
    """The published results (conf/results.yaml)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    studies: dict[str, StudyConfig] = field(default_factory=dict)


@dataclass
class UIConfig:
    host: str = MISSING
    port: int = MISSING


@dataclass
class UITop:
    """The MLflow dashboard (conf/ui.yaml)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ui: UIConfig = field(default_factory=UIConfig)


@dataclass
class GenerateConfig:
    """Text generation (conf/generate.yaml)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run_id: str | None = MISSING
    model_uri: str | None = MISSING
    prime: str = MISSING
    words: int = MISSING
    strategy: str = MISSING
    temperature: float = MISSING
    top_k: int = MISSING
    seed: int = MISSING


# Each dataset's schema is its module's SPEC.schema (pipeline.data.registry), picked by data.source; data.name may
# differ (a variant such as imdb_long gets its own prepared folder).
OPTIMIZER_SCHEMAS: dict[str, type] = {"sgd": SGDConfig, "adam": AdamConfig, "rmsprop": RMSpropConfig}
TOP_SCHEMAS: dict[str, type] = {
    "config": Config,
    "download": DownloadTop,
    "prepare": PrepareTop,
    "report": ReportTop,
    "bench": BenchTop,
    "profile": ProfileTop,
    "generate": GenerateConfig,
    "ui": UITop,
    "results": ResultsTop,
}


def register() -> None:
    """Register the schema with Hydra and the `rnnlab.root` resolver with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver("rnnlab.root"):
        OmegaConf.register_new_resolver("rnnlab.root", lambda: os.environ.get("RNNLAB_ROOT", str(ROOT)))
    cs = ConfigStore.instance()
    for name, schema in TOP_SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=schema)
    for spec in registry.specs():  # a dataset registered at run time gets its node on the next call
        cs.store(group="data", name=f"{spec.source}_schema", node=spec.schema)
    for name, schema in OPTIMIZER_SCHEMAS.items():
        cs.store(group="optimizer", name=f"{name}_schema", node=schema)
    _explain_unknown_overrides()


RESULT_SECTIONS = ("data", "model", "optimizer", "trainer", "seed")
# Trainer keys that say how to run, not what comes out: verbosity, checkpoints, resuming, threads, samples, guards.
RUNTIME_KEYS = (
    "verbose",
    "checkpoint",
    "resume",
    "resume_run_id",
    "intra_op_threads",
    "inter_op_threads",
    "generate_words",
    "divergence_factor",
    "compile_cache",  # where compiled loops are kept: the same code either way
    "kernels",  # fused or Keras' loops: the same math, so the same run (the tag says which ran)
    "wavefront",  # the fused LSTM layers in one loop or one after another: the same math
)


# Overrides that change a preset's training but not what it is: the budget (a published figure is for the preset's).
BUDGET_KEYS = ("budget", "trainer.epochs", "trainer.max_steps_per_epoch", "trainer.early_stopping_patience")


def preset_changes(overrides: list[str]) -> list[str]:
    """The command line's overrides that change what a preset trains (data, model, optimizer, trainer less its
    runtime keys, or their groups: ``model=gru``, ``budget=smoke``), so that its published figure is not for them."""
    changes = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        section, _, rest = key.partition(".")
        if section in (*RESULT_SECTIONS[:-1], "budget") and not (section == "trainer" and rest in RUNTIME_KEYS):
            changes.append(override.lstrip("+~"))
    return changes


def only_budget(changes: list[str]) -> bool:
    """Changes of the training budget only (``BUDGET_KEYS``): the preset's model, at fewer or more steps."""
    return all(change.split("=", 1)[0] in BUDGET_KEYS for change in changes)


def result_config(cfg: DictConfig) -> dict[str, Any]:
    """What determines a training run's result: data, model, optimizer, trainer (less its runtime keys) and seed.
    These, and only these, are a run's MLflow params and its resume fingerprint: no paths, stores or stage settings,
    so a run started by ``dvc repro`` is the same run when resumed from a shell."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    result = {key: resolved[key] for key in RESULT_SECTIONS}
    result["trainer"] = {k: v for k, v in result["trainer"].items() if k not in RUNTIME_KEYS}
    return result


def config_id(cfg: DictConfig, data_digest: str, precision: str) -> str:
    """sha256 of everything that determines a run's result except its seed: ``result_config`` less the seed, the
    data version, the precision actually used and an own cell's code version. Runs with the same ``config_id`` are
    repeats of one configuration (however they were launched), so the report aggregates them over seeds."""
    result = {k: v for k, v in result_config(cfg).items() if k != "seed"}
    result.update(data_digest=data_digest, precision=precision, **_cell_code(cfg))
    return hashlib.sha256(json.dumps(result, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cell_code(cfg: DictConfig) -> dict[str, str]:
    """An own cell's code version (``cells.code_digest``), where the model has one: none for the built-in cells."""
    digest = cells.code_digest(str(OmegaConf.select(cfg, "model.cell", default="")))
    return {"cell_code": digest} if digest else {}


def fingerprint(cfg: DictConfig) -> str:
    """sha256 of ``result_config`` (and an own cell's code version): two runs with the same fingerprint train the
    same model, so one may resume the other."""
    result = {**result_config(cfg), **_cell_code(cfg)}
    return hashlib.sha256(json.dumps(result, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    "model.param_budget": Bound(1, nullable=True, note=" (null = model.units as given)"),
    "anchor.value": Bound(0, nullable=True, note=" (null = no published number)"),
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
    "trainer.batch_size": COUNT,
    "trainer.bptt_steps": COUNT,
    "trainer.max_steps_per_epoch": _cap("the whole training set"),
    "trainer.max_eval_batches": _cap("the whole split"),
    "trainer.early_stopping_patience": _cap("never stop early"),
    "trainer.steps_per_execution": COUNT,
    "trainer.intra_op_threads": Bound(0, note=" (0 = TensorFlow's choice)"),
    "trainer.inter_op_threads": Bound(0, note=" (0 = TensorFlow's choice)"),
    "trainer.verbose": Bound(0, 2, note=" (1 = a progress bar on a terminal; 0 or 2 = one line per epoch)"),
    "trainer.generate_words": Bound(0, note=" (0 = no samples)"),
    "trainer.divergence_factor": Bound(1, low_open=True, nullable=True, note=" (null = never stop)"),
    "tracking.connect_timeout": POSITIVE,
    "tracking.http_retries": Bound(0),
    "tracking.http_timeout": Bound(1, note=" (whole seconds)"),
    "bench.steps": COUNT,
    "bench.rounds": COUNT,
    "bench.whole_run_steps": Bound(0, nullable=True, note=" (0 or null = no whole-run timing)"),
    "bench.whole_run_repeats": COUNT,
    "profile.steps": COUNT,
    "ui.port": Bound(1, 65535),
    "search.warmup_epochs": Bound(0),
    "search.startup_trials": Bound(0),
    "search.trial": Bound(0, nullable=True, note=" (null = not a search trial)"),
}
GENERATE_BOUNDS: dict[str, Bound] = {
    "words": COUNT,
    "temperature": Bound(0, note=" (0 = greedy: always the likeliest word)"),
    "top_k": Bound(0, note=" (0 = all words)"),
    "seed": SEED,
    **{key: bound for key, bound in BOUNDS.items() if key.startswith("tracking.")},
}
STRATEGIES = sampling.STRATEGIES
BENCH_ISAS = ("native", "avx2")  # the machine classes make bench times (pipeline.bench)
ANCHOR_METRICS = tuple(f"{split}/{o.metric}" for split in ("test", "val") for o in objective.BY_KIND.values())
# Keys with a fixed set of values: (what a value is called, the choices).
CHOICES: dict[str, tuple[str, tuple[str, ...]]] = {
    "optimizer.name": ("optimizer", OPTIMIZERS),
    "trainer.precision": ("precision", PRECISIONS),
    "trainer.kernels": ("kernel choice", ("auto", "fused", "keras")),
    "anchor.metric": ("anchor metric", ANCHOR_METRICS),
    "search.pruner": ("pruner", ("median", "hyperband", "none")),
}
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # data.name names a folder: one path component


def _override(value: Any) -> str:
    """``value`` as it is written on Hydra's command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return plain_number(value) if isinstance(value, int | float) and math.isfinite(value) else str(value)


_ABSENT = object()


def _check_table(
    cfg: DictConfig,
    bounds: Mapping[str, Bound],
    choices: Mapping[str, tuple[str, tuple[str, ...]]],
) -> None:
    """Each key of ``bounds`` in its range and each key of ``choices`` one of its values (keys this config does not
    have are skipped); the message names the key, the value and the valid values."""
    for key, bound in bounds.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not bound.admits(value):
            finite = " and finite" if isinstance(value, float) and not math.isfinite(value) else ""
            raise ConfigError(f"{key}: must be {bound.describe()}{finite}{bound.note}, got {_override(value)}")
    for key, (noun, allowed, *tail) in choices.items():  # tail: what else the key takes, said after the choices
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and value is not None:  # null passed the schema: the key is optional
            _check(
                value in allowed, key, f"unknown {noun} {value!r}; choose one of {', '.join(allowed)}{''.join(tail)}"
            )


def _check_schema(cfg: DictConfig, schema: DictConfig, resolve: bool = True) -> None:
    """Re-check the whole tree against the schema: ``+key=value`` overrides and Hydra's open data node skip it."""
    try:
        OmegaConf.merge(schema, OmegaConf.to_container(cfg, resolve=resolve))
    except OmegaConfBaseException as err:  # several error types, each naming the full key
        raise ConfigError(explain_unknown_key(str(err)) or f"invalid config: {err}") from err


def schema_of(cfg: DictConfig, top: str = "config") -> DictConfig:
    """The schema of entry point ``top`` with the data and optimizer sections this config picked."""
    schema = OmegaConf.structured(TOP_SCHEMAS[top])
    if "data" in cfg:
        schema.data = OmegaConf.structured(registry.get(cfg.data.get("source")).schema)
    if "optimizer" in cfg:
        name = cfg.optimizer.get("name")
        _check(name in OPTIMIZER_SCHEMAS, "optimizer.name", f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
        schema.optimizer = OmegaConf.structured(OPTIMIZER_SCHEMAS[name])
    return schema


def _check_data(
    d: DictConfig, bounds: dict[str, Bound], choices: dict[str, tuple[str, tuple[str, ...]]]
) -> registry.DatasetSpec:
    """The dataset's kind and name checked, its ranges and choices added to the tables; its spec."""
    spec = registry.get(d.source)
    bounds.update({f"data.{key}": bound for key, bound in spec.bounds.items()})
    choices.update({f"data.{key}": choice for key, choice in spec.choices.items()})
    kind = spec.kind  # declared by the dataset; conf/data/<name>.yaml repeats it (it is a logged param) and must agree
    _check(d.kind == kind, "data.kind", f"{spec.source} is a {kind} dataset, got {d.kind!r}; drop the override")
    _check(
        bool(NAME.fullmatch(d.name)),
        "data.name",
        f"names the folder data/prepared/<name>: letters, digits, '_', '-' and '.' only, got {d.name!r}",
    )
    return spec


def anchor_problem(anchor: Mapping[str, Any]) -> str | None:
    """Why a published figure cannot be cited, or None: it needs its metric and a public source a reader can open
    (author, title, year, and where in it: a table, section or page, or a URL)."""
    source, url = str(anchor.get("source") or ""), anchor.get("url")
    if not anchor.get("metric"):
        return "a published figure needs anchor.metric (which metric it reports)"
    if not re.search(r"\b(19|20)\d\d\b", source):
        return f"anchor.source {source!r} names no year: give author, title, year and where in it"
    if not (url or re.search(r"\b(table|section|chapter|page|p\.|figure|fig\.|listing)\s*[\d.]+", source, re.I)):
        return f"anchor.source {source!r} says not where the figure is: add a table, section or page, or anchor.url"
    return None


OWN_CELL = ", or package.module:Class for your own cell (a colon before the class)"


def _check_own_cell(model: DictConfig) -> None:
    """A cell from the user's code (``package.module:Class``) must import, be an RNN cell and take the settings the
    config asks of it: one line if not."""
    try:
        cells.check_settings(model.cell, model.get("recurrent_dropout"), model.get("init_scale"))
    except cells.CellError as err:
        raise ConfigError(str(err)) from None


def _check_top_keys(cfg: DictConfig, top: str) -> None:
    """A top-level key no entry point has (``+seeed=7``: ``+`` adds a key Hydra would otherwise refuse) is a typo."""
    known = {f.name for schema in TOP_SCHEMAS.values() for f in fields(schema)} | {"hydra"}
    for key in (k for k in cfg if k not in known):
        names = [f.name for f in fields(TOP_SCHEMAS[top])]
        close = difflib.get_close_matches(str(key), names, n=1)
        guess = f"; did you mean {close[0]}?" if close else "."
        raise ConfigError(f"{key}: no such key at the top level{guess} Valid keys there: {', '.join(names)}.")


def validate(cfg: DictConfig, top: str = "config") -> DictConfig:
    """Fail early, naming the key, its value and the valid ones, on values the schema types cannot rule out.
    ``top`` names the entry point (conf/<top>.yaml); of a larger config (a training config handed to ``prepare``)
    only the sections that entry point reads are checked."""
    _check_top_keys(cfg, top)
    cfg = OmegaConf.masked_copy(cfg, [f.name for f in fields(TOP_SCHEMAS[top]) if f.name in cfg])
    _check_schema(cfg, schema_of(cfg, top), resolve=top == "config" or "data" in cfg)  # others name no dataset
    bounds, choices = (
        dict(BOUNDS),
        {**CHOICES, "model.cell": ("cell type", cells.names(), OWN_CELL)},
    )  # cells: registered now
    if cells.is_path(OmegaConf.select(cfg, "model.cell", default=None)):
        _check_own_cell(cfg.model)
        del choices["model.cell"]
    spec = _check_data(cfg.data, bounds, choices) if "data" in cfg else None
    _check_table(cfg, bounds, choices)
    if spec is not None and spec.check is not None:
        spec.check(cfg.data)  # what the dataset's ranges cannot express (toy: min_len <= max_len < max_value)
    for key in ("tracking.uri", "report.experiments"):
        _check(OmegaConf.select(cfg, key, default="set") != "", key, "must not be empty")
    if "anchor" in cfg and cfg.anchor.value is not None:
        problem = anchor_problem(cfg.anchor)
        _check(problem is None, "anchor", f"{problem}, or set anchor.value=null when no public source states it")
    if "sweep" in cfg:
        resume = str(cfg.sweep.resume).lower()
        _check(resume in ("auto", "true", "false"), "sweep.resume", f"choose auto, true or false, got {resume!r}")
    if "bench" in cfg:
        _check(len(cfg.bench.cases) >= 1, "bench.cases", "name at least one case")
        wrong = [isa for isa in cfg.bench.isa if isa not in BENCH_ISAS]
        _check(not wrong, "bench.isa", f"choose from {', '.join(BENCH_ISAS)}, got {wrong[0] if wrong else ''!r}")
    if "trainer" in cfg:
        t = cfg.trainer
        _check(
            not (t.jit_compile and t.deterministic),
            "trainer.jit_compile",
            "Keras turns XLA off while TF's op determinism is on; also set trainer.deterministic=false",
        )
        _check(bool(cfg.tracking.experiment), "tracking.experiment", "must not be empty")
    return cfg


def validate_generate(cfg: DictConfig) -> DictConfig:
    """The generate config's checks (``conf/generate.yaml``); the vocabulary bound of ``top_k`` is checked once
    the run's vocabulary is loaded."""
    _check_schema(cfg, OmegaConf.structured(GenerateConfig), resolve=False)  # tracking.experiment names no dataset
    _check_table(cfg, GENERATE_BOUNDS, {"strategy": ("strategy", STRATEGIES)})
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
        *TOP_SCHEMAS.values(),
        PathsConfig,
        DownloadConfig,
        ModelConfig,
        TrainerConfig,
        TrackingConfig,
        ReportConfig,
        BenchConfig,
        ProfileConfig,
        DataConfig,
        *OPTIMIZER_SCHEMAS.values(),
    )
}  # and each dataset's schema, from the registry: see _schema_named
_NOT_IN = re.compile(r"Key '(?P<key>[^']+)' not in '(?P<schema>\w+)'")
_FULL_KEY = re.compile(r"full_key: (?P<key>\S+)")
_OVERRIDE = re.compile(r"Could not override '(?P<key>[^']+)'")


def _schema_named(name: str) -> type | None:
    """The schema class called ``name``: one of ``SCHEMAS`` or a registered dataset's (one added at run time too)."""
    return SCHEMAS.get(name) or next((s.schema for s in registry.specs() if s.schema.__name__ == name), None)


def explain_unknown_key(message: str) -> str | None:
    """For Hydra's or OmegaConf's error about a key the schema lacks (``model.unitz=3``): a message that names it,
    guesses the key meant and lists the valid keys of its section. None when ``message`` is about anything else."""
    found = _NOT_IN.search(message)
    schema = _schema_named(found["schema"]) if found else None
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
