"""Checkpoints and model files that a crash or a full disk never leaves half-written or out of step.

A checkpoint folder holds a manifest, ``state.json`` (epochs done, metrics, random-generator states, and the name,
size and SHA-256 of its model file), and the one model file it names (``model-<epochs>-<token>.keras``: the whole
model with its optimizer state). A save writes a new model file beside the old one, syncs it to disk, then replaces
the manifest in one rename: before that rename the folder still describes the previous epoch, after it the new one,
and the model file a manifest names is always complete. Whatever else is in the folder (a partial file, the model of
a save that a crash cut short) is garbage that the next save removes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline import models  # noqa: F401  (registers the custom layers that load_model needs)

log = logging.getLogger(__name__)

MANIFEST = "state.json"
LEGACY_MODEL = "model.keras"  # checkpoints written before the manifest named its model file
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest time, for every entry of a reproducible model file
FIXED_DATE_SAVED = "1980-01-01@00:00:00"  # Keras' date format: KerasFileEditor prints the key, so it stays


class CheckpointError(OSError):
    """A checkpoint or model file could not be written or read. ``str()`` says what happened and what to do;
    ``with_resume`` adds how to continue the run, which only the caller knows."""

    def __init__(self, problem: str, action: str, path: Path | str, code: int | None = None):
        super().__init__(code, problem, str(path))
        self.problem, self.action, self.path = problem, action, Path(path)

    def __str__(self) -> str:
        return f"{self.problem}: {self.action}."

    def __reduce__(self):  # OSError pickles its (errno, strerror, filename) args, which are not this __init__'s
        return type(self), (self.problem, self.action, str(self.path), self.errno)

    def with_resume(self, run_id: str | None) -> CheckpointError:
        """The same error, ending with the command that continues the run once the cause is fixed."""
        then = f"continue with trainer.resume_run_id={run_id}" if run_id else "run again"
        return type(self)(self.problem, f"{self.action}, then {then}", self.path, self.errno)


class DiskFullError(CheckpointError):
    """No space (or quota, or file-size limit) left where a checkpoint or model file was being written."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint that cannot be loaded: resuming it again cannot help, so ``with_resume`` adds nothing."""

    def with_resume(self, run_id: str | None) -> CheckpointError:
        return self


def rng_states(model: keras.Model) -> list:
    """The dropout layers' random-generator states: Keras' model files do not restore them, so a resumed run
    would draw other dropout masks than the uninterrupted one."""
    return [v for v in model.non_trainable_variables if "seed_generator_state" in v.path]


class Checkpoint:
    """The last finished epoch of a run, replaced atomically by each ``save`` (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.state_path = self.folder / MANIFEST

    @property
    def model_path(self) -> Path | None:
        """The model file of the complete checkpoint, or None."""
        state = self._manifest()
        return self.folder / state.get("model", LEGACY_MODEL) if state else None

    def exists(self) -> bool:
        """True only for a complete checkpoint: a readable manifest and the whole model file it names."""
        state = self._manifest()
        if state is None:
            return False
        model_file = self.folder / state.get("model", LEGACY_MODEL)
        if not model_file.is_file():
            return False
        return "model_bytes" not in state or model_file.stat().st_size == state["model_bytes"]

    def save(self, model: keras.Model, epoch: int, history: list[dict[str, float]]) -> None:
        """Make epoch ``epoch`` (0-based) the checkpoint. On any error the previous checkpoint stays as it was, no
        partial file is left, and a ``CheckpointError`` (``DiskFullError`` for a full disk) says so."""
        previous = self._manifest()
        self._remove_leftovers(previous)
        name = f"model-{epoch + 1:04d}-{secrets.token_hex(4)}.keras"
        model_file, partial = self.folder / name, self.folder / f".partial-{name}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            model.save(partial)
            _fsync(partial)
            size, digest = _size_and_digest(partial)
            os.replace(partial, model_file)
            rng = [np.asarray(v).tolist() for v in rng_states(model)]
            state = {"epochs_done": epoch + 1, "history": history, "rng": rng}
            state.update({"model": name, "model_bytes": size, "model_sha256": digest})
            _write_json_durable(self.state_path, state)  # the commit: from here on, this epoch is the checkpoint
        except BaseException as err:
            if (self._manifest() or {}).get("model") == name:
                raise  # an interrupt just after the commit: the new checkpoint stands
            partial.unlink(missing_ok=True)
            model_file.unlink(missing_ok=True)
            cause = _os_error(err) if isinstance(err, Exception) else None
            if cause is None:
                raise
            raise self._save_error(cause, epoch, previous) from err
        self._remove_leftovers(state, replaced=previous)

    def load(self) -> tuple[keras.Model, int, list[dict[str, float]]]:
        """The model (optimizer and random-generator states included), the epochs done, and the metrics so far."""
        state = self._manifest()
        if state is None:
            raise DamagedCheckpointError(
                f"no complete checkpoint in {self.folder}", "train afresh (drop trainer.resume_run_id)", self.folder
            )
        model_file = self.folder / state.get("model", LEGACY_MODEL)
        if "model_sha256" in state:
            size, digest = _size_and_digest(model_file) if model_file.is_file() else (None, None)
            if (size, digest) != (state["model_bytes"], state["model_sha256"]):
                raise DamagedCheckpointError(
                    f"the checkpoint in {self.folder} is damaged: {model_file.name} is missing or is not the file "
                    f"{MANIFEST} names ({state['model_bytes']} bytes, sha256 {state['model_sha256'][:12]}...)",
                    f"delete {self.folder} and train afresh",
                    model_file,
                )
        model = keras.models.load_model(model_file)
        for variable, value in zip(rng_states(model), state["rng"], strict=True):
            variable.assign(value)
        return model, state["epochs_done"], state["history"]

    def _manifest(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and "epochs_done" in state else None

    def _remove_leftovers(self, keep: dict[str, Any] | None, replaced: dict[str, Any] | None = None) -> None:
        """Remove all but the manifest and its model file: the model file of the checkpoint just ``replaced``, and
        whatever a crash or a failed save left behind."""
        live = {MANIFEST, keep.get("model", LEGACY_MODEL)} if keep else set()
        superseded = (replaced or {}).get("model", LEGACY_MODEL) if replaced else None
        for entry in self.folder.iterdir() if self.folder.is_dir() else ():
            if entry.name in live:
                continue
            if entry.name != superseded:
                log.info("removing %s, left by an interrupted checkpoint save", entry)
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink(missing_ok=True)
            except OSError as err:  # garbage that stays costs space, not correctness
                log.warning("could not remove %s: %s", entry, err)

    def _save_error(self, err: OSError, epoch: int, previous: dict[str, Any] | None) -> CheckpointError:
        kept = (
            f"the previous checkpoint (epoch {previous['epochs_done']}) is intact"
            if previous
            else "there is no earlier checkpoint"
        )
        what = f"epoch {epoch + 1}'s checkpoint in {self.folder}"
        if _disk_full(err):
            needs = f"; a checkpoint of this model takes {_size(previous['model_bytes'])}" if previous else ""
            return DiskFullError(
                f"no space left on the device while writing {what} ({_free(self.folder)} free there{needs}). "
                f"Nothing half-written is left and {kept}",
                "free disk space",
                self.folder,
                errno.ENOSPC,
            )
        return CheckpointError(
            f"could not write {what}: {err}. Nothing half-written is left and {kept}",
            "fix that (a writable paths.checkpoints)",
            self.folder,
            err.errno,
        )


def save_model_atomic(model: keras.Model, path: Path) -> None:
    """Write ``model`` to ``path`` (a ``.keras`` file) via a partial file in the same folder and a rename: a crash or
    a full disk leaves the previous file, never a truncated one. Raises ``DiskFullError``/``CheckpointError``.

    The file is reproducible (see ``_make_reproducible``): the same model gives the same bytes, so a deterministic
    re-run of the pipeline leaves the model's hash in ``dvc.lock`` unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.stem}.partial-*.keras"):  # from a process killed mid-write
        stale.unlink(missing_ok=True)
    partial = path.with_name(f".{path.stem}.partial-{secrets.token_hex(4)}.keras")
    try:
        model.save(partial)
        _make_reproducible(partial)
        _fsync(partial)
        os.replace(partial, path)
    except BaseException as err:
        partial.unlink(missing_ok=True)
        cause = _os_error(err) if isinstance(err, Exception) else None
        if cause is None:
            raise
        before = "the previous file is unchanged" if path.exists() else "there is no file there"
        if _disk_full(cause):
            problem = f"no space left on the device while writing the model {path} ({_free(path.parent)} free there)"
            raise DiskFullError(
                f"{problem}. Nothing half-written is left; {before}", "free disk space", path, errno.ENOSPC
            ) from err
        problem = f"could not write the model {path}: {cause}. Nothing half-written is left; {before}"
        raise CheckpointError(problem, "fix that (a writable paths.models)", path, cause.errno) from err
    _fsync_dir(path.parent)


def _make_reproducible(path: Path) -> None:
    """Rewrite the ``.keras`` zip at ``path`` so that its bytes depend on the model alone. Keras writes three things
    that change from one save of the same model to the next: ``date_saved`` in ``metadata.json``, the modification
    time of the ``model.weights.h5`` entry, and in ``config.json`` the ``shared_object_id`` of objects that several
    layers share, which is their memory address (``id()``). This fixes the date and the entry times, numbers the
    shared objects 1, 2, ... in order of appearance (ids only pair objects within the file, so loading is unchanged)
    and sorts the entries. The weights file needs nothing: h5py does not record times. Layer names stay as they are:
    Keras numbers unnamed layers per process (``dense_1``), which a fresh process per stage makes reproducible."""
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    for name, rewrite in (("metadata.json", _fixed_date), ("config.json", _renumbered_shared_objects)):
        if name in entries:
            entries[name] = json.dumps(rewrite(json.loads(entries[name]))).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.external_attr = 0o600 << 16  # what Keras gives its own entries, whatever the umask
            archive.writestr(info, entries[name])


def _fixed_date(metadata: dict[str, Any]) -> dict[str, Any]:
    return {**metadata, "date_saved": FIXED_DATE_SAVED} if "date_saved" in metadata else metadata


def _renumbered_shared_objects(node: Any, numbers: dict[int, int] | None = None) -> Any:
    """``node`` (a Keras config) with each distinct ``shared_object_id`` replaced by its order of appearance."""
    numbers = {} if numbers is None else numbers
    if isinstance(node, list):
        return [_renumbered_shared_objects(item, numbers) for item in node]
    if not isinstance(node, dict):
        return node
    return {
        key: numbers.setdefault(value, len(numbers) + 1)
        if key == "shared_object_id"
        else _renumbered_shared_objects(value, numbers)
        for key, value in node.items()
    }


def _write_json_durable(path: Path, obj: Any) -> None:
    """Write a JSON file via a synced temporary file and a rename, then sync the folder, so the rename survives a
    power cut too."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable; best effort (some filesystems cannot sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _size_and_digest(path: Path) -> tuple[int, str]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: libraries (zipfile, h5py) may raise another exception while handling it."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _disk_full(err: OSError) -> bool:
    # h5py reports a full disk as OSError without errno, "... errno = 28, error message = 'No space left on device'"
    return err.errno in DISK_FULL or any(s in str(err) for s in ("No space left", "Disk quota", "File too large"))


def _free(folder: Path) -> str:
    try:
        return _size(shutil.disk_usage(folder).free)
    except OSError:
        return "unknown space"


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            break
    return f"{n:.1f} {unit}"
