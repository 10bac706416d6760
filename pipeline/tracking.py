"""All MLflow code lives here: store set-up, run lifecycle, params, tags, per-epoch metrics and the model.

Nothing else in the package imports mlflow, so a tracking change (a server, another backend) is made here alone.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import keras  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
from mlflow.models import infer_signature  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

log = logging.getLogger(__name__)

# Keras history key -> our metric name. Everything we log uses the `<split>/<metric>` scheme.
KERAS_METRICS = {
    "loss": "train/loss",
    "accuracy": "train/accuracy",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
    "learning_rate": "train/learning_rate",
}


_interrupted = False
_writing = 0  # store writes under way (nested)
_deferred = False  # an interrupt came during one: raise it when the write is done


def note_interrupt() -> bool:
    """Record that the process was told to stop (SIGTERM), so the run ends KILLED even if the interruption
    surfaces as another exception inside a library. Returns whether to interrupt now: not in the middle of a
    store write, which an exception cut in half could leave the store's session unable to mark the run KILLED."""
    global _interrupted, _deferred
    _interrupted = True
    if _writing:
        _deferred = True
        return False
    return True


def _store_write(method):
    """A Tracker method that writes to the store: a SIGTERM during it takes effect when it returns."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        global _writing, _deferred
        _writing += 1
        try:
            return method(*args, **kwargs)
        finally:
            _writing -= 1
            if not _writing and _deferred:
                _deferred = False
                raise KeyboardInterrupt("SIGTERM during a store write")

    return wrapper


class TrackingError(RuntimeError):
    """The tracking store failed mid-run; the message says what is kept and how to continue."""


def redact(value: Any) -> Any:
    """A URI with its password replaced by ``***`` (``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db``);
    anything else unchanged. Credentials must never reach params, artifacts or logs."""
    if not isinstance(value, str) or "://" not in value or "@" not in value:
        return value
    parts = urlsplit(value)
    if parts.password is None:
        return value
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"units": 64}}`` -> ``{"model.units": 64}``: the resolved config as MLflow params (redacted)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = redact(value)
    return out


def redacted(cfg: Any) -> Any:
    """A plain copy of a resolved config with every credential redacted (for the config.yaml artifact)."""
    if isinstance(cfg, Mapping):
        return {k: redacted(v) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [redacted(v) for v in cfg]
    return redact(cfg)


def git_state(root: str | Path) -> tuple[str, bool]:
    """(commit, dirty) of the checkout at ``root``; ("unknown", False) outside git."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(status.strip())


def keras_to_metric_names(logs: Mapping[str, float]) -> dict[str, float]:
    """Rename Keras' log keys (``val_loss``) to ours (``val/loss``); unknown keys keep a ``train/`` prefix."""
    out = {}
    for key, value in logs.items():
        name = KERAS_METRICS.get(key)
        if name is None:
            name = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
        out[name] = float(value)
    return out


class Tracker:
    """One MLflow run. ``enabled=False`` keeps the interface and logs nothing (training without a store)."""

    def __init__(self, client: MlflowClient | None, run_id: str | None):
        self.client = client
        self.run_id = run_id

    @property
    def enabled(self) -> bool:
        return self.client is not None

    @_store_write
    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """All of one step's metrics in one call: one round trip per epoch, which matters with a server."""
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        try:
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
        except Exception as err:  # the store went away: say so, loudly, with what is kept
            raise TrackingError(
                f"the tracking store {redact(mlflow.get_tracking_uri())} failed while logging step {step} of run "
                f"{self.run_id}: {type(err).__name__}: {str(err)[:300]}"
            ) from err

    def log_missing(self, history: list[Mapping[str, float]], probe: str) -> None:
        """Log the entries of ``history`` (one per step) whose ``probe`` metric never reached the store."""
        if not self.enabled:
            return
        logged = {m.step for m in self.client.get_metric_history(self.run_id, probe)}
        for step, metrics in enumerate(history):
            if step not in logged:
                self.log_metrics(metrics, step=step)

    @_store_write
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    @_store_write
    def log_text(self, text: str, path: str) -> None:
        """A text artifact (e.g. generated samples) at ``path`` inside the run."""
        if self.enabled:
            mlflow.log_text(text, path)

    @_store_write
    def log_model(self, model: keras.Model, example: np.ndarray, extra_files: list[str] | None = None) -> str | None:
        """Log the Keras model with a signature inferred from ``example`` (and files it needs, such as the
        vocabulary); return its model URI."""
        if not self.enabled:
            return None
        signature = infer_signature(example, model.predict(example, verbose=0))
        for path in extra_files or []:
            mlflow.log_artifact(path)
        info = mlflow.keras.log_model(model, name="model", signature=signature)
        return info.model_uri


def use_store(cfg: DictConfig) -> None:
    """Point MLflow at the configured tracking store (reading runs needs no experiment)."""
    mlflow.set_tracking_uri(cfg.uri)


def setup_experiment(cfg: DictConfig) -> str:
    """Point MLflow at the configured store and return the experiment id, creating it with an explicit
    artifact location (MLflow's default would be ``./mlruns`` under whatever the working directory is)."""
    if redact(cfg.uri) != cfg.uri:  # MLflow prints run and model links with the URI: not with a password in it
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        os.environ["MLFLOW_PRINT_MODEL_URLS_ON_CREATION"] = "false"
    mlflow.set_tracking_uri(cfg.uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    if not cfg.artifact_location:  # a tracking server with proxied artifacts decides
        return client.create_experiment(cfg.experiment)
    location = Path(cfg.artifact_location)
    location.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(cfg.experiment, artifact_location=location.resolve().as_uri())


def find_resumable(cfg: DictConfig, fingerprint: str) -> str | None:
    """The newest run of this experiment with the same config fingerprint that did not finish, or None."""
    setup_experiment(cfg.tracking)
    runs = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        filter_string=f"tags.config_hash = '{fingerprint}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


@contextmanager
def start_run(cfg: DictConfig, tags: Mapping[str, Any], resume_run_id: str | None = None) -> Iterator[Tracker]:
    """An MLflow run holding the flattened resolved config as params, the full config as an artifact, and tags;
    or, with ``resume_run_id``, that earlier run reopened (its params stay as first logged).

    The run ends FINISHED, FAILED on an exception, or KILLED on Ctrl-C/SIGTERM, so the UI never shows a run that
    is neither running nor explained. If the store itself is gone, the original error is what propagates.
    """
    if not cfg.tracking.enabled:
        yield Tracker(None, None)
        return
    experiment_id = setup_experiment(cfg.tracking)
    resolved = redacted(OmegaConf.to_container(cfg, resolve=True))
    parent = sweep_parent()
    # A readable default name; MLflow's generated names repeat here, because every run seeds `random` alike.
    run_name = cfg.tracking.run_name or f"{tags['dataset']}-{tags['cell']}"
    if parent and HydraConfig.initialized():
        run_name = f"{run_name}-job{HydraConfig.get().job.num}"
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id)
    elif parent:
        # A sweep's job: a child of the sweep's parent run, in the parent's experiment so the UI nests them.
        parent_run = MlflowClient().get_run(parent)
        tags = {**tags, "sweep": parent_run.data.tags.get("sweep", ""), "sweep_parent": parent}
        run = mlflow.start_run(experiment_id=parent_run.info.experiment_id, run_name=run_name, parent_run_id=parent)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
    try:
        tracker = Tracker(MlflowClient(), run.info.run_id)
        if not resume_run_id:
            mlflow.log_params(flatten(resolved))
            mlflow.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        tracker.set_tags(tags)
        verb = "resumed" if resume_run_id else "started"
        where = redact(cfg.tracking.uri)
        log.info("MLflow run %s %s in %r at %s", run.info.run_id, verb, cfg.tracking.experiment, where)
        yield tracker
    except BaseException as err:
        killed = isinstance(err, KeyboardInterrupt) or _interrupted
        _end_run("KILLED" if killed else "FAILED")
        raise
    _end_run("FINISHED")


def _end_run(status: str) -> None:
    """End the active run; if the store is unreachable, warn instead of hiding the error that ended training."""
    try:
        mlflow.end_run(status=status)
    except Exception as err:  # mlflow has already dropped the run locally: the next run starts clean
        log.warning("could not mark the MLflow run %s (%s): %s", status, type(err).__name__, str(err)[:200])


SWEEP_ENV = "RNNLAB_SWEEP_PARENT_RUN_ID"


def sweep_parent() -> str | None:
    """The parent run id of the Hydra multirun this process belongs to, if any."""
    return os.environ.get(SWEEP_ENV) or None


def sweep_overrides(hydra_cfg: DictConfig) -> dict[str, str]:
    """The sweep's command-line overrides and named sweep parameters, as ``{key: "a,b,c"}``."""
    out = {}
    for item in list(hydra_cfg.overrides.task) + [
        f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()
    ]:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


class SweepCallback(Callback):
    """Hydra callback: a multirun becomes one MLflow parent run, named after the sweep with the overrides as
    params; each job's run is its child (see ``start_run``). The parent ends FINISHED when every child did."""

    def __init__(self) -> None:
        self.parent: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.tracking.enabled:
            return
        overrides = sweep_overrides(config.hydra)
        # Children of a sweep over datasets would otherwise land in several experiments: keep them together.
        tracking_cfg = OmegaConf.to_container(config.tracking, resolve=True)
        if "data" in overrides and "," in overrides["data"]:
            tracking_cfg["experiment"] = "rnnlab-sweeps"
        experiment_id = setup_experiment(OmegaConf.create(tracking_cfg))
        name = config.tracking.sweep_name or "sweep " + " ".join(f"{k}={v}" for k, v in overrides.items())
        client = MlflowClient()
        run = client.create_run(experiment_id, run_name=name, tags={"sweep": name, "sweep_role": "parent"})
        for key, value in overrides.items():
            client.log_param(run.info.run_id, key, value)
        self.parent = run.info.run_id
        os.environ[SWEEP_ENV] = self.parent  # inherited by the jobs, in this process or the launcher's workers
        log.info("sweep %r: MLflow parent run %s", name, self.parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.parent:
            return
        client = MlflowClient()
        parent = client.get_run(self.parent)
        children = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent}'"
        )
        statuses = [c.info.status for c in children]
        client.log_metric(self.parent, "sweep/children", len(children))
        client.log_metric(self.parent, "sweep/finished", statuses.count("FINISHED"))
        ok = bool(children) and all(s == "FINISHED" for s in statuses)
        client.set_terminated(self.parent, status="FINISHED" if ok else "FAILED")
        os.environ.pop(SWEEP_ENV, None)
        log.info(
            "sweep finished: %d of %d runs FINISHED (parent %s)", statuses.count("FINISHED"), len(children), self.parent
        )


def finished_runs(tracking_uri: str, experiment_pattern: str) -> pd.DataFrame:
    """Every FINISHED training run (sweep parents left out) of the experiments matching ``experiment_pattern``
    (SQL LIKE, e.g. ``rnnlab-%``), one row each with ``params.*``, ``metrics.*`` and ``tags.*`` columns."""
    mlflow.set_tracking_uri(tracking_uri)
    experiments = mlflow.search_experiments(filter_string=f"name LIKE '{experiment_pattern}'")
    if not experiments:
        return pd.DataFrame()
    runs = mlflow.search_runs(
        experiment_ids=[e.experiment_id for e in experiments],
        filter_string="attributes.status = 'FINISHED'",
        output_format="pandas",
    )
    if runs.empty:
        return runs
    if "tags.sweep_role" in runs:
        runs = runs[runs["tags.sweep_role"] != "parent"]
    return runs.reset_index(drop=True)


def metric_histories(tracking_uri: str, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
    """Long table (run_id, key, step, value) of the per-epoch metrics ``keys`` of each run."""
    client = MlflowClient(tracking_uri=tracking_uri)
    rows = [
        (run_id, key, m.step, m.value)
        for run_id in run_ids
        for key in keys
        for m in client.get_metric_history(run_id, key)
    ]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def load_model(uri: str) -> keras.Model:
    """A logged Keras model from ``runs:/<id>/model`` or any MLflow model URI."""
    return mlflow.keras.load_model(uri)


def run_of_model(uri: str) -> str:
    """The run id that logged the model at ``uri``."""
    return mlflow.models.get_model_info(uri).run_id


def download_artifact(run_id: str, path: str) -> Path:
    """A local copy of one artifact of a run."""
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))
