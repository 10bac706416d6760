"""All MLflow code lives here: store set-up, run lifecycle, params, tags, per-epoch metrics and the model.

Nothing else in the package imports mlflow, so a tracking change (a server, another backend) is made here alone.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import keras  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
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


def note_interrupt() -> None:
    """Record that the process was told to stop (SIGTERM), so the run ends KILLED even if the interruption
    surfaces as another exception inside a library."""
    global _interrupted
    _interrupted = True


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"units": 64}}`` -> ``{"model.units": 64}``: the resolved config as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


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

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_text(self, text: str, path: str) -> None:
        """A text artifact (e.g. generated samples) at ``path`` inside the run."""
        if self.enabled:
            mlflow.log_text(text, path)

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
    mlflow.set_tracking_uri(cfg.uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
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
    is neither running nor explained.
    """
    if not cfg.tracking.enabled:
        yield Tracker(None, None)
        return
    experiment_id = setup_experiment(cfg.tracking)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if resume_run_id:
        run_context = mlflow.start_run(run_id=resume_run_id)
    else:
        run_context = mlflow.start_run(experiment_id=experiment_id, run_name=cfg.tracking.run_name)
    with run_context as run:
        tracker = Tracker(MlflowClient(), run.info.run_id)
        if not resume_run_id:
            mlflow.log_params(flatten(resolved))
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.yaml"
                path.write_text(OmegaConf.to_yaml(resolved))
                mlflow.log_artifact(str(path))
        tracker.set_tags(tags)
        verb = "resumed" if resume_run_id else "started"
        log.info(
            "MLflow run %s %s in experiment %r at %s", run.info.run_id, verb, cfg.tracking.experiment, cfg.tracking.uri
        )
        try:
            yield tracker
        except BaseException as err:
            killed = isinstance(err, KeyboardInterrupt) or _interrupted
            mlflow.end_run(status="KILLED" if killed else "FAILED")
            raise


def load_model(uri: str) -> keras.Model:
    """A logged Keras model from ``runs:/<id>/model`` or any MLflow model URI."""
    return mlflow.keras.load_model(uri)


def run_of_model(uri: str) -> str:
    """The run id that logged the model at ``uri``."""
    return mlflow.models.get_model_info(uri).run_id


def download_artifact(run_id: str, path: str) -> Path:
    """A local copy of one artifact of a run."""
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))
