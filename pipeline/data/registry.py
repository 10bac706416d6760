"""The datasets: each module of ``pipeline.data`` that defines ``SPEC = DatasetSpec(...)`` is one, declared there
once and read by everything else (the config schema and its checks, the download and prepare stages, the sweeper).

Adding a dataset is its module, its ``conf/data/<name>.yaml`` and its ``dvc.yaml`` stages; code outside the package
(a test, a script) may ``register`` one at run time. The built-in modules are found and imported on the first
lookup, so importing this module costs nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pkgutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline import data
from pipeline.data import Dataset
from pipeline.schema import Bound, ConfigError, DataConfig

log = logging.getLogger(__name__)

KINDS = ("classification", "regression", "tagging", "language_model")  # the task heads pipeline.tasks builds


class SpecError(ValueError):
    """A dataset declaration that cannot be registered: the message says which field is wrong."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset. ``source`` is ``data.source`` (and the raw folder ``data/raw/<source>``); ``schema`` the
    dataclass of its ``data`` section (a ``DataConfig``); ``bounds`` and ``choices`` its own numeric ranges and fixed
    value sets, keyed by field name; ``check`` what they cannot express (raise ``ConfigError``). ``download(out,
    mirror, timeout)`` fetches its raw files and ``verify(raw)`` re-checks them before a build (both None for
    generated data); ``build(cfg.data, raw)`` makes the ``Dataset``."""

    source: str
    kind: str
    schema: type[DataConfig]
    build: Callable[[Any, Path], Dataset]
    bounds: Mapping[str, Bound] = field(default_factory=dict)
    choices: Mapping[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    check: Callable[[Any], None] | None = None
    download: Callable[[Path, str | None, float], list[Path]] | None = None
    verify: Callable[[Path], None] | None = None


_REGISTRY: dict[str, DatasetSpec] = {}
_discovered = False


def _discover() -> None:
    """Register the ``SPEC`` of every module in ``pipeline.data``, once, in the order of their names."""
    global _discovered
    if _discovered:
        return
    _discovered = True  # first: a dataset module's own import of this module must not start another round
    try:
        for module in sorted(info.name for info in pkgutil.iter_modules(data.__path__)):
            if module.startswith("_") or module == __name__.rpartition(".")[2]:
                continue
            spec = getattr(importlib.import_module(f"{data.__name__}.{module}"), "SPEC", None)
            if isinstance(spec, DatasetSpec) and spec.source not in _REGISTRY:
                _add(spec)
    except BaseException:
        _discovered = False  # a broken module: the next lookup says so again
        raise


def _problem(spec: DatasetSpec) -> str | None:
    """What is wrong with ``spec``, or None."""
    if not spec.source.isidentifier():
        return f"source {spec.source!r}: letters, digits and '_' only (it names data/raw/<source> and DVC stages)"
    if spec.kind not in KINDS:
        return f"kind {spec.kind!r}: choose one of {', '.join(KINDS)}"
    if not (isinstance(spec.schema, type) and issubclass(spec.schema, DataConfig)):
        return f"schema {spec.schema!r}: must be a dataclass derived from pipeline.schema.DataConfig"
    names = {f.name for f in dataclasses.fields(spec.schema)}
    unknown = sorted((set(spec.bounds) | set(spec.choices)) - names)
    if unknown:
        return f"bounds/choices name keys that {spec.schema.__name__} lacks: {', '.join(unknown)}"
    return None


def _add(spec: DatasetSpec) -> None:
    problem = _problem(spec)
    if problem:
        raise SpecError(f"dataset {spec.source!r}: {problem}")
    if spec.source in _REGISTRY:
        raise SpecError(f"dataset {spec.source!r} is already registered")
    _REGISTRY[spec.source] = spec


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset at run time (its source must be new). Hydra's ``data/<source>_schema`` node for a config file
    of its own comes with the next ``pipeline.config.register()``."""
    _discover()
    _add(spec)
    return spec


def unregister(source: str) -> None:
    _REGISTRY.pop(source, None)


@contextmanager
def registered(spec: DatasetSpec) -> Iterator[DatasetSpec]:
    """``spec`` registered for the ``with`` block only (a test's, or a script's own dataset)."""
    register(spec)
    try:
        yield spec
    finally:
        unregister(spec.source)


def specs() -> tuple[DatasetSpec, ...]:
    _discover()
    return tuple(_REGISTRY.values())


def sources() -> tuple[str, ...]:
    """Every ``data.source`` there is."""
    return tuple(spec.source for spec in specs())


def get(source: Any) -> DatasetSpec:
    """The dataset ``data.source`` names; an unknown one is an error that lists the known ones."""
    _discover()
    if source not in _REGISTRY:
        raise ConfigError(f"data.source: unknown dataset {source!r}; choose one of {(*_REGISTRY,)}")
    return _REGISTRY[source]


def kind_of(source: str) -> str:
    """One of ``KINDS``: which head, metric and objective the dataset's runs have."""
    return get(source).kind


def prepare(cfg: DictConfig) -> dict[str, Any]:
    """Build the dataset ``cfg.data`` describes from its verified raw files (under ``cfg.paths.data``) and write it
    to ``data/prepared/<name>``; return its stats. The prepare stage runs it after validating ``cfg``; the
    benchmark times it."""
    spec = get(cfg.data.source)
    started = time.perf_counter()
    raw = data.raw_dir(cfg.paths.data, spec.source)
    if spec.download is not None and not raw.exists():
        raise data.DataError(
            f"no raw files at {raw}. Download them first: `python -m pipeline.download data={cfg.data.name}` "
            f"(or `dvc repro download_{cfg.data.source}`)."
        )
    if spec.verify is not None:
        spec.verify(raw)  # raises DataError on a raw file damaged or replaced since the download
    dataset = spec.build(cfg.data, raw)
    out_dir = data.prepared_dir(cfg.paths.data, cfg.data.name)
    dataset.meta["config"] = OmegaConf.to_container(cfg.data, resolve=True)  # training checks its data.* against it
    data.save(out_dir, dataset)
    log.info("prepared %s in %.1f s -> %s: %s", cfg.data.name, time.perf_counter() - started, out_dir, dataset.stats)
    return dataset.stats
