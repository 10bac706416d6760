"""The store and the run lifecycle: store checks and set-up, a run's start, tags, per-epoch metrics, model, end,
its lock and its replacement after a crash; and reading runs back for the report and generation.

Nothing outside ``pipeline.tracking`` imports mlflow, so a tracking change (a server, another backend) is made here.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import keras  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from mlflow.data.dataset_source_registry import resolve_dataset_source  # noqa: E402
from mlflow.data.meta_dataset import MetaDataset  # noqa: E402
from mlflow.entities import DatasetInput, InputTag, Metric, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import infer_signature  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.types.schema import Schema, TensorSpec  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pipeline import cells  # noqa: E402
from pipeline.config import preset_changes, result_config  # noqa: E402
from pipeline.redaction import redact, redacted  # noqa: E402
from pipeline.sweep import Pruned

log = logging.getLogger(__name__)

# A logged model's requirements, stated: MLflow would otherwise load the model in a child process to infer them
# (about 9 s a model here).
MODEL_REQUIREMENTS = [f"{name}=={importlib.metadata.version(name)}" for name in ("mlflow", "keras", "tensorflow-cpu")]
DATASET_ATTEMPTS = 4  # log_inputs tries (a race between parallel sweep jobs loses the first)
ERROR_TAG_CHARS = 5000  # MLflow tag values hold at most 8,000 characters


class TrackingError(RuntimeError):
    """The tracking store failed or cannot be used; the message names the store and what to do."""


class Interrupts:
    """Whether the process was told to stop (Ctrl-C, SIGTERM, SIGHUP), shared by the signal handler and the run it
    stops.

    A stop in the middle of a store write or of a call into TensorFlow's compiled step is held until it is done: an
    exception that cut a write in half could leave the store's session unable to mark the run KILLED, and one raised
    inside TensorFlow's Python machinery could leave its native state torn (a crash at exit). A second stop during
    the same span stops at once (a store or a call that hangs must not make the process unstoppable)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: int | None = None
        self.unmarked = False  # the store failed to mark the stopped run KILLED (it still shows RUNNING)
        self._holding = 0  # held spans under way (nested): store writes, calls into TensorFlow
        self._deferred = False  # an interrupt came during one: raise it when the span is done

    def note(self, signum: int | None = None) -> bool:
        """Record the request; return whether to interrupt now (not in the middle of a held span)."""
        self.requested, self.signal = True, signum
        if self._holding and not self._deferred:
            self._deferred = True
            return False
        return True

    @contextmanager
    def held(self) -> Iterator[None]:
        """A span a stop waits for (a store write, a call into TensorFlow): an interrupt noted during it is raised
        once it is done."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            if not self._holding and self._deferred:
                self._deferred = False
                raise KeyboardInterrupt("stopped after a span it waited for")


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


CODE_SUFFIXES = (".py", ".yaml", ".yml")  # an untracked file of these can change a run (a new cell, model config)


def git_state(root: str | Path) -> tuple[str, bool]:
    """(commit, dirty) of the checkout at ``root``; ("unknown", False) outside git. Dirty: a tracked file changed,
    or an untracked code or config file (``CODE_SUFFIXES``; not ignored) that the commit does not hold."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=all"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    changed = [
        line for line in status.splitlines() if not line.startswith("??") or line.strip('"').endswith(CODE_SUFFIXES)
    ]
    return commit, bool(changed)


def preset_name() -> str | None:
    """The ``experiment=`` preset this Hydra job composed, if any."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("experiment")


def preset_overrides() -> list[str]:
    """This Hydra job's command-line overrides that change its preset (``config.preset_changes``)."""
    if not HydraConfig.initialized():
        return []
    return preset_changes(list(HydraConfig.get().overrides.task))


def run_tags(
    cfg: DictConfig, fingerprint: str, job_id: str, data_digest: str, params_count: int, precision: str
) -> dict:
    """What a run is, as tags to filter and group by: dataset, cell, seed, the configuration it repeats
    (``config_id``: all but the seed), the code and data versions, size, preset and its published anchor."""
    commit, dirty = git_state(cfg.paths.root)
    anchor = {f"anchor.{k}": v for k, v in cfg.anchor.items() if v is not None} if cfg.anchor.value is not None else {}
    preset, changes = preset_name(), preset_overrides()
    return {
        "config_id": job_id,
        **({"preset": preset} if preset else {}),
        **({"preset_changes": " ".join(changes)} if preset and changes else {}),
        **anchor,
        "dataset": cfg.data.name,
        "cell": ("bi" if cfg.model.bidirectional else "") + cfg.model.cell,
        **({"cell_code": code} if (code := cells.code_digest(cfg.model.cell)) else {}),
        "git_commit": commit,
        "git_dirty": dirty,
        "data_digest": data_digest,
        "seed": cfg.seed,
        "config_hash": fingerprint,
        "params_count": params_count,
        "precision": precision,
    }


# --- the store -----------------------------------------------------------------------------------------------------


def _store_problem(uri: str, timeout: float) -> str | None:
    """What stops the store at ``uri`` from being used, in words with the fix; None when it looks usable.

    Checked before any run starts, so that a wrong, read-only, corrupt or unreachable store costs seconds and one
    line, not a traceback after minutes of MLflow's retries."""
    parts = urlsplit(uri)
    if parts.scheme in ("file", ""):
        folder = Path(unquote(parts.path) or ".").resolve()
        return (
            "it is a file store (a folder of runs), which MLflow keeps only in maintenance mode: rnnlab needs a "
            f"database store, e.g. tracking.uri=sqlite:///{folder.parent / 'mlflow.db'} (or tracking=server)"
        )
    if parts.scheme == "sqlite":
        return _sqlite_problem(unquote(parts.path[1:]) if parts.path.startswith("/") else parts.path)
    if parts.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(_health_request(parts), timeout=timeout) as response:
                if response.status == 200:
                    return None
                return f"it answered /health with HTTP {response.status}: is it an MLflow server?"
        except urllib.error.HTTPError as err:
            return f"it answered /health with HTTP {err.code}: is it an MLflow server?"
        except (OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            return f"no answer within {timeout:g} s ({reason}): start it (`make server`) or fix the URI"
    if parts.hostname:  # a database URI: the host must at least accept connections
        try:
            socket.create_connection((parts.hostname, parts.port or 5432), timeout=timeout).close()
        except OSError as err:
            return f"cannot connect to {parts.hostname}:{parts.port} ({err}): start the database or fix the URI"
    return None


def _health_request(parts) -> urllib.request.Request:
    """GET <server>/health, the credentials of ``user:password@`` sent as HTTP basic auth (as MLflow sends them)."""
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    url = parts._replace(netloc=netloc, path=parts.path.rstrip("/") + "/health", query="", fragment="").geturl()
    request = urllib.request.Request(url)
    if parts.username is not None:
        token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def _sqlite_problem(path: str) -> str | None:
    if not path or path == ":memory:":
        return "an in-memory store keeps nothing: name a file, sqlite:////absolute/path/mlflow.db"
    db = Path(path)
    if not db.is_absolute():
        return (
            f"the path {path!r} is relative, so it would depend on the working directory: "
            f"write it absolute, sqlite:///{Path(path).resolve()}"
        )
    if not db.parent.is_dir():
        return f"its folder {db.parent} does not exist: create it, or fix tracking.uri"
    if not db.exists():
        return None if os.access(db.parent, os.W_OK) else f"its folder {db.parent} is not writable"
    if not os.access(db, os.R_OK | os.W_OK) or not os.access(db.parent, os.W_OK):
        return "it is read-only (the file or its folder): fix the permissions, or point tracking.uri elsewhere"
    with open(db, "rb") as fh:
        header = fh.read(16)
    if header and header != b"SQLite format 3\x00":
        return "the file is not an SQLite database: move it away (MLflow creates a new store), or fix tracking.uri"
    try:
        _read_schema(db)
    except sqlite3.Error as err:
        if "locked" in str(err):  # another process is writing to it: busy, not broken
            return None
        return f"SQLite cannot read it ({err}): restore a backup, or move it away to start a new store"
    return None


def _read_schema(db: Path) -> None:
    """Read the store's schema without writing to it; but a write a killed process left half done (a hot
    ``-journal``) only a read-write open can roll back, as MLflow's own open would."""

    def read(mode: str) -> None:
        with closing(sqlite3.connect(f"file:{db}?mode={mode}", uri=True, timeout=5)) as conn:
            conn.execute("select count(*) from sqlite_master").fetchone()

    try:
        read("ro")
    except sqlite3.OperationalError as err:
        if "readonly" not in str(err):
            raise
        read("rw")
        log.info("the tracking store %s had a write left half done (a killed process): SQLite rolled it back", db)


def connect(cfg: DictConfig) -> MlflowClient:
    """Check the configured store, bound MLflow's HTTP retries and point MLflow at it; the one client everything
    writes through. A store that cannot work fails here, in seconds, with one message."""
    check_store(cfg.uri, cfg.connect_timeout)
    # Transient faults are retried, a bounded number of times (MLflow's defaults wait minutes on a dead server).
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.http_retries)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(cfg.http_timeout))
    if redact(cfg.uri) != cfg.uri:  # MLflow prints run and model links with the URI: not with a password in it
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        os.environ["MLFLOW_PRINT_MODEL_URLS_ON_CREATION"] = "false"
    mlflow.set_tracking_uri(cfg.uri)
    return open_store(cfg.uri)


def check_store(uri: str, timeout: float) -> None:
    """Raise ``TrackingError`` with the fix when the store at ``uri`` cannot be used."""
    problem = _store_problem(uri, timeout)
    if problem:
        raise TrackingError(f"the tracking store {redact(uri)} cannot be used: {problem}")


_OPENED: set[str] = set()  # stores this process has created or checked (MLflow keeps one store object per URI)


def open_store(uri: str) -> MlflowClient:
    """A client of ``uri`` whose tables exist: the first use in a process creates (or checks) them under a lock.

    MLflow creates a new sqlite store's tables and runs its migrations without a lock, so two processes meeting a
    new store at once (two terminals, a sweep and a report) broke one another (``table ... already exists``)."""
    if uri in _OPENED:
        return MlflowClient(uri)
    for attempt in range(2):
        try:
            with _store_lock(uri):
                client = MlflowClient(uri)  # builds MLflow's store object: its tables, its migrations
            break
        except Exception as err:  # a program other than rnnlab (`mlflow ui`) may create the tables unlocked
            if attempt or ("already exists" not in str(err) and "duplicate column" not in str(err)):
                raise TrackingError(f"the tracking store {redact(uri)} failed: {_short(err)}") from err
            time.sleep(2)
    _OPENED.add(uri)
    return client


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock on a sqlite store's folder while its tables are made; nothing for other stores (a tracking
    server or a database creates its own schema once)."""
    parts = urlsplit(uri)
    if parts.scheme != "sqlite":
        yield
        return
    fd = os.open(Path(unquote(parts.path[1:])).parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes, or the process dies
        yield
    finally:
        os.close(fd)


# MLflow 3's UI opens an experiment by its kind: without it, on the GenAI traces overview instead of the runs.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def _create_experiment(cfg: DictConfig, client: MlflowClient) -> str:
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    if not cfg.artifact_location:  # a tracking server with proxied artifacts decides
        return client.create_experiment(cfg.experiment, tags=tags)
    location = Path(cfg.artifact_location)
    location.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(cfg.experiment, artifact_location=location.resolve().as_uri(), tags=tags)


def setup_experiment(cfg: DictConfig, client: MlflowClient | None = None) -> str:
    """The experiment id of ``cfg.experiment``, created if needed with an explicit artifact location (MLflow's
    default would be ``./mlruns`` under whatever the working directory is)."""
    client = client or connect(cfg)
    try:
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            experiment = client.get_experiment(_create_experiment(cfg, client))
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # also experiments made by older versions
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    except (MlflowException, OSError) as err:
        raise TrackingError(f"the tracking store {redact(cfg.uri)} failed: {_short(err)}") from err


def _short(err: BaseException) -> str:
    return redact(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300])


# --- runs ----------------------------------------------------------------------------------------------------------


class Tracker:
    """One MLflow run, written through one client. ``enabled=False`` keeps the interface and logs nothing."""

    def __init__(self, client: MlflowClient | None, run_id: str | None, interrupts: Interrupts | None = None):
        self.client = client
        self.run_id = run_id
        self.interrupts = interrupts or Interrupts()

    @property
    def enabled(self) -> bool:
        return self.client is not None

    @contextmanager
    def _write(self, what: str) -> Iterator[None]:
        """A store write: held from a SIGTERM until done; a store that went away becomes one clear error."""
        with self.interrupts.held():
            try:
                yield
            except (KeyboardInterrupt, TrackingError):
                raise
            except Exception as err:  # the store went away: say so, loudly, with what is kept
                raise TrackingError(
                    f"the tracking store {redact(mlflow.get_tracking_uri())} failed while {what} of run "
                    f"{self.run_id}: {_short(err)}"
                ) from err

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """All of one step's metrics in one call: one round trip per epoch, which matters with a server."""
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        with self._write(f"logging step {step}"):
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def log_missing(self, history: list[Mapping[str, float]], probe: str) -> None:
        """Log the entries of ``history`` (one per step) whose ``probe`` metric never reached the store."""
        if not self.enabled:
            return
        logged = {m.step for m in self.client.get_metric_history(self.run_id, probe)}
        for step, metrics in enumerate(history):
            if step not in logged:
                self.log_metrics(metrics, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            with self._write("tagging"):
                batch = [RunTag(k, redact(str(v))) for k, v in tags.items()]
                self.client.log_batch(self.run_id, tags=batch, synchronous=True)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.enabled:
            with self._write("logging params"):
                for chunk in _chunks(list(params.items()), 100):  # MLflow takes at most 100 params per call
                    self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in chunk])

    def log_dataset(self, name: str, folder: Path, splits: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Each prepared split as an MLflow dataset input (the runs table's Dataset column): ``<name>.<split>``,
        its DVC digest (the md5 in dvc.lock), the file it was read from, its arrays' schema and its context."""
        if not self.enabled:
            return
        inputs = [
            DatasetInput(
                _split_dataset(name, folder / f"{split}.npz", arrays)._to_mlflow_entity(),
                tags=[InputTag(MLFLOW_DATASET_CONTEXT, split)],
            )
            for split, arrays in splits.items()
            if (folder / f"{split}.npz").exists()
        ]
        with self._write("logging the dataset inputs"):
            for attempt in range(DATASET_ATTEMPTS):
                try:  # MLflow checks, then inserts a new dataset: parallel jobs can race to insert the same one
                    self.client.log_inputs(self.run_id, datasets=inputs)
                    return
                except MlflowException:
                    if attempt == DATASET_ATTEMPTS - 1:
                        raise
                    time.sleep(0.2 * (attempt + 1))  # the winner's dataset is there now: link to it

    def log_text(self, text: str, path: str) -> None:
        """A text artifact (e.g. generated samples) at ``path`` inside the run."""
        if self.enabled:
            with self._write(f"writing {path}"):
                self.client.log_text(self.run_id, redact(text), path)

    def log_model(self, model: keras.Model, example: np.ndarray, extra_files: list[str] | None = None) -> str | None:
        """Log the Keras model with a signature inferred from ``example`` (and files it needs, such as the
        vocabulary); return its model URI. Needs the run active in MLflow (``start_run`` makes it so)."""
        if not self.enabled:
            return None
        # The output's shape and dtype from the model's graph: a call on the example runs each layer eagerly (0.2-0.4 s)
        output = model.compute_output_spec(keras.KerasTensor(example.shape, str(example.dtype)))
        signature = infer_signature(example, np.zeros(output.shape, output.dtype))
        with self._write("logging the model"):
            for path in extra_files or []:
                self.client.log_artifact(self.run_id, path)
            return mlflow.keras.log_model(
                model, name="model", signature=signature, pip_requirements=MODEL_REQUIREMENTS
            ).model_uri

    def fail(self, err: BaseException) -> None:
        """Keep why the run ended in the run itself (tag ``error`` and the run's description in the UI)."""
        if not self.enabled:
            return
        message = redact(f"{type(err).__name__}: {err}")[:ERROR_TAG_CHARS]
        try:
            tags = [RunTag("error", message), RunTag("mlflow.note.content", f"Ended by:\n\n{message}")]
            self.client.log_batch(self.run_id, tags=tags, synchronous=True)
        except Exception as store_err:  # the store may be what failed: the console still has the message
            log.warning("could not record the error in run %s: %s", self.run_id, _short(store_err))


def _split_dataset(name: str, path: Path, arrays: Mapping[str, np.ndarray]) -> MetaDataset:
    md5 = hashlib.md5()  # DVC's file hash: the same digest as the split's entry in dvc.lock
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            md5.update(chunk)
    schema = Schema([TensorSpec(a.dtype, (-1, *a.shape[1:]), name=k) for k, a in arrays.items()])
    with warnings.catch_warnings():  # MLflow registers its local source twice and warns that it cannot choose
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(path.resolve()))
    return MetaDataset(source, name=f"{name}.{path.stem}", digest=md5.hexdigest(), schema=schema)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def describe_run(
    cfg: DictConfig, run_id: str, artifacts: bool = False, client: MlflowClient | None = None
) -> dict[str, Any]:
    """What a run is, before anything is read from it: ``status``, ``tags``, ``params`` (and with ``artifacts``
    its top-level artifact paths); a clear error when the store has no such run. ``client``: the caller's
    connection (else one is made)."""
    client = client or connect(cfg)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise TrackingError(
            f"no MLflow run {run_id} in {redact(cfg.uri)}: check the id (`make ui` lists the runs) and tracking.uri"
        ) from err
    described = {"status": run.info.status, "tags": dict(run.data.tags), "params": dict(run.data.params)}
    if artifacts:
        described["artifacts"] = {a.path for a in client.list_artifacts(run_id)}
    return described


def run_state(cfg: DictConfig, run_id: str, client: MlflowClient | None = None) -> str:
    """The status of ``run_id`` (RUNNING, FINISHED, FAILED, KILLED); a clear error if the store has no such run."""
    return describe_run(cfg, run_id, client=client)["status"]


def find_resumable(cfg: DictConfig, fingerprint: str, client: MlflowClient | None = None) -> str | None:
    """The newest run of this experiment with the same config fingerprint that did not finish, or None."""
    client = client or connect(cfg.tracking)
    experiment_id = setup_experiment(cfg.tracking, client)
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.config_hash = '{fingerprint}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


class RunLock:
    """An exclusive lock on one run held by the process that trains it (``<checkpoints>/<run id>.lock``), so a
    resume can tell a live run from a crashed one. The kernel drops it when the process dies, kill -9 included."""

    def __init__(self, folder: str | Path, run_id: str):
        self.path = Path(folder) / f"{run_id}.lock"
        self._fh = None

    def holder(self) -> str | None:
        """Who holds the lock ("pid N since T"), or None when nobody does."""
        if not self.path.exists():
            return None
        with open(self.path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                return fh.read().strip() or "another process"
            fcntl.flock(fh, fcntl.LOCK_UN)
        return None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")  # noqa: SIM115 (held for the whole run)
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            self._fh = None
            raise
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._fh.flush()
        return self

    def release(self, remove: bool = True) -> None:
        if self._fh is not None:
            if remove:
                self.path.unlink(missing_ok=True)
            self._fh.close()
            self._fh = None


@contextmanager
def start_run(
    cfg: DictConfig,
    tags: Mapping[str, Any],
    resume_run_id: str | None = None,
    interrupts: Interrupts | None = None,
    client: MlflowClient | None = None,
) -> Iterator[Tracker]:
    """An MLflow run holding the flattened resolved config as params, the full config as an artifact, and tags;
    or, with ``resume_run_id``, that earlier run reopened (its params stay as first logged).

    The run ends FINISHED, FAILED on an exception (the error kept in the run), or KILLED on Ctrl-C/SIGTERM, so the
    UI never shows a run that is neither running nor explained. If the store itself is gone, the original error
    is what propagates. ``client``: the caller's connection to ``cfg.tracking``'s store (else one is made).
    """
    interrupts = interrupts or Interrupts()
    if not cfg.tracking.enabled:
        yield Tracker(None, None, interrupts)
        return
    client = client or connect(cfg.tracking)
    experiment_id = setup_experiment(cfg.tracking, client)
    run = _open_run(cfg, client, tags, experiment_id, resume_run_id)
    tracker = Tracker(client, run.info.run_id, interrupts)
    try:
        if not resume_run_id:  # params: what determines the result; the artifact: the whole config as it ran
            tracker.log_params({**flatten(redacted(result_config(cfg))), "precision": tags.get("precision")})
            tracker.log_text(OmegaConf.to_yaml(redacted(OmegaConf.to_container(cfg, resolve=True))), "config.yaml")
        parent = sweep_parent()
        sweep_tags = {"sweep": _sweep_name(client, parent), "sweep_parent": parent} if parent else {}
        tracker.set_tags({**(resumed_tags(run.data.tags, tags) if resume_run_id else tags), **sweep_tags})
        verb = "resumed" if resume_run_id else "started"
        log.info(
            "MLflow run %s %s in %r at %s", tracker.run_id, verb, cfg.tracking.experiment, redact(cfg.tracking.uri)
        )
        yield tracker
    except Pruned as err:  # the search stopped it: a finished trial, marked as pruned
        tracker.set_tags({"trial_state": "PRUNED", "pruned_after_epoch": err.epoch + 1})
        _end_run("FINISHED")
        raise
    except BaseException as err:
        killed, marked = isinstance(err, KeyboardInterrupt) or interrupts.requested, False
        try:
            with interrupts.held():  # a stop now waits for the run's end to be written
                if not killed:
                    tracker.fail(err)
                marked = _end_run("KILLED" if killed else "FAILED")
        except KeyboardInterrupt:  # a second stop cut it short: the run may still show RUNNING
            pass
        interrupts.unmarked = not marked
        raise
    _end_run("FINISHED")


def resumed_tags(first: Mapping[str, str], now: Mapping[str, Any]) -> dict[str, Any]:
    """A resumed run's tags: those it started with stay (the commit and data that trained its first epochs); a
    value that differs now is kept beside, as ``resumed.<tag>`` (the commit that trained the rest)."""
    return {
        **{key: value for key, value in now.items() if key not in first},
        **{f"resumed.{key}": value for key, value in now.items() if key in first and first[key] != str(value)},
    }


def _open_run(cfg: DictConfig, client: MlflowClient, tags: Mapping[str, Any], experiment_id: str, resume: str | None):
    """Start (or reopen) the active MLflow run: a sweep job's run is a child of the sweep's parent run, in the
    parent's experiment so the UI nests them."""
    if resume:
        return mlflow.start_run(run_id=resume)
    parent = sweep_parent()
    # A readable default name; MLflow's generated names repeat here, because every run seeds `random` alike.
    run_name = cfg.tracking.run_name or f"{tags['dataset']}-{tags['cell']}"
    if parent and HydraConfig.initialized():
        run_name = f"{run_name}-job{HydraConfig.get().job.num}"
    if parent:
        parent_experiment = client.get_run(parent).info.experiment_id
        return mlflow.start_run(experiment_id=parent_experiment, run_name=redact(run_name), parent_run_id=parent)
    return mlflow.start_run(experiment_id=experiment_id, run_name=redact(run_name))


def _sweep_name(client: MlflowClient, parent: str) -> str:
    return client.get_run(parent).data.tags.get("sweep", "")


def _end_run(status: str) -> bool:
    """End the active run; if the store is unreachable, warn instead of hiding the error that ended training.
    Whether the run is marked."""
    try:
        mlflow.end_run(status=status)
    except Exception as err:  # mlflow has already dropped the run locally: the next run starts clean
        log.warning("could not mark the MLflow run %s: %s", status, _short(err))
        return False
    return True


SWEEP_ENV = "RNNLAB_SWEEP_PARENT_RUN_ID"
SWEEP_STORE_ENV = "RNNLAB_SWEEP_TRACKING_URI"


def sweep_parent() -> str | None:
    """The parent run id of the Hydra multirun this process belongs to, if any."""
    return os.environ.get(SWEEP_ENV) or None


SUPERSEDED_NOTE = "Superseded by run {new}: its process ended (kill -9, a crash) before a checkpoint."
ORPHAN_NOTE = "Ended KILLED: its process ended without ending the run (kill -9, a crash)."


def supersede(
    cfg: DictConfig, run_ids: list[str], new_id: str | None = None, client: MlflowClient | None = None
) -> None:
    """Runs whose process is gone, replaced by ``new_id`` (or by nothing): one left RUNNING ends KILLED, and each is
    tagged ``superseded_by`` (the new run is tagged ``supersedes``), so no dead run shows as running for ever."""
    if not run_ids or not cfg.enabled:
        return
    client = client or connect(cfg)
    for run_id in run_ids:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
        note = SUPERSEDED_NOTE.format(new=new_id) if new_id else ORPHAN_NOTE
        tags = [RunTag("mlflow.note.content", note), *([RunTag("superseded_by", new_id)] if new_id else [])]
        client.log_batch(run_id, tags=tags, synchronous=True)
    if new_id:
        client.set_tag(new_id, "supersedes", ",".join(run_ids))
    why = f"superseded by {new_id}" if new_id else "its process is gone"
    log.info("run%s %s ended KILLED or tagged: %s", "s" * (len(run_ids) > 1), ", ".join(run_ids), why)


# --- reading runs back ------------------------------------------------------------------------------------------------


def experiments(tracking_uri: str, pattern: str) -> list[tuple[str, str]]:
    """(name, id) of the experiments whose name matches ``pattern`` (SQL LIKE), by name."""
    check_store(tracking_uri, timeout=5)
    found = open_store(tracking_uri).search_experiments(filter_string=f"name LIKE '{pattern}'")
    return sorted((e.name, e.experiment_id) for e in found)


def finished_runs(tracking_uri: str, experiment_pattern: str, status: str = "FINISHED") -> pd.DataFrame:
    """Every FINISHED (or ``status``) training run (sweep parents left out) of the experiments matching
    ``experiment_pattern`` (SQL LIKE, e.g. ``rnnlab-%``), one row each with ``params.*``, ``metrics.*`` and
    ``tags.*`` columns."""
    check_store(tracking_uri, timeout=10)
    open_store(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    experiments = mlflow.search_experiments(filter_string=f"name LIKE '{experiment_pattern}'")
    if not experiments:
        return pd.DataFrame()
    runs = mlflow.search_runs(
        experiment_ids=[e.experiment_id for e in experiments],
        filter_string=f"attributes.status = '{status}'",
        output_format="pandas",
    )
    if runs.empty:
        return runs
    if "tags.sweep_role" in runs:
        runs = runs[runs["tags.sweep_role"] != "parent"]
    return runs.reset_index(drop=True)


def metric_histories(tracking_uri: str, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
    """Long table (run_id, key, step, value) of the per-epoch metrics ``keys`` of each run."""
    client = open_store(tracking_uri)
    rows = [
        (run_id, key, m.step, m.value)
        for run_id in run_ids
        for key in keys
        for m in client.get_metric_history(run_id, key)
    ]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def load_model(uri: str) -> keras.Model:
    """A logged Keras model from ``runs:/<id>/model`` or any MLflow model URI. A model of a cell from the user's own
    code (``model.cell=package.module:Class``) finds its class again through the run that logged it."""
    run_id = mlflow.models.get_model_info(uri).run_id
    cell = mlflow.MlflowClient().get_run(run_id).data.params.get("model.cell") if run_id else None
    if cells.is_path(cell):
        cells.get(cell)  # imports the user's module and registers the class with Keras' serializer
    return mlflow.keras.load_model(uri)


def run_of_model(cfg: DictConfig, uri: str) -> str:
    """The run id that logged the model at ``uri``; a clear error naming the store when there is no such model."""
    connect(cfg)
    try:
        return mlflow.models.get_model_info(uri).run_id
    except (MlflowException, OSError) as err:
        raise TrackingError(
            f"no MLflow model {uri} in {redact(cfg.uri)}: check the URI (runs:/<run id>/model or models:/<model id>)"
        ) from err


def download_artifact(run_id: str, path: str) -> Path:
    """A local copy of one artifact of a run."""
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))
