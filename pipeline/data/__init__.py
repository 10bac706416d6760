"""Prepared datasets on disk: one folder per dataset with ``<split>.npz``, ``meta.json`` and ``stats.json``.

The prepare stage writes them; training only reads them, so the two meet at this module alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class DataError(RuntimeError):
    """Prepared data is missing or unreadable; the message says which command makes it."""


@dataclass
class Dataset:
    """A prepared dataset: arrays per split, what the model needs to know (``meta``), summary ``stats``, the
    vocabulary for token data, and a content ``digest`` (the data version recorded with every run)."""

    splits: dict[str, dict[str, np.ndarray]]
    meta: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)
    vocab: list[str] | None = None
    digest: str = ""


def split_off(labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held-out): a seeded, class-stratified ``size`` held out, so validation keeps the class
    balance of the whole; both in ascending order."""
    n = len(labels)
    if not 0 < size < n:
        raise ValueError(f"a validation split of {size} out of {n} examples is impossible: choose 0 < size < {n}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * size / n
    take = np.floor(quota).astype(int)
    # Hand the rounding remainder to the classes with the largest fractional parts: exactly ``size`` held out.
    take[np.argsort(-(quota - take), kind="stable")[: size - take.sum()]] += 1
    held = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    )
    rest = np.setdiff1d(np.arange(n), held)
    return rest, np.sort(held)


def prepared_dir(data_root: str | Path, name: str) -> Path:
    return Path(data_root) / "prepared" / name


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save(out_dir: Path, dataset: Dataset) -> None:
    """Write every split, the vocabulary if any, then ``meta.json`` and ``stats.json``."""
    for name, arrays in dataset.splits.items():
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(out_dir / f"{name}.npz", buf.getvalue())
    if dataset.vocab is not None:
        atomic_write_bytes(out_dir / "vocab.txt", ("\n".join(dataset.vocab) + "\n").encode())
    write_json(out_dir / "meta.json", dataset.meta)
    write_json(out_dir / "stats.json", dataset.stats)


def digest_files(paths: list[Path]) -> str:
    """sha256 over file names and contents: the data version recorded with every run."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_meta(data_root: str | Path, name: str) -> dict[str, Any]:
    """A prepared dataset's ``meta.json`` (what a model needs to know), or say which command prepares it."""
    folder = prepared_dir(data_root, name)
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        raise DataError(
            f"no prepared data for {name!r} at {folder}. Prepare it first: "
            f"`python -m pipeline.prepare data={name}` (or `dvc repro prepare_{name}`)."
        )
    return json.loads(meta_path.read_text())


def load(data_root: str | Path, name: str) -> Dataset:
    """Load a prepared dataset, or say which command prepares it."""
    folder = prepared_dir(data_root, name)
    meta = load_meta(data_root, name)
    files = sorted(folder.glob("*.npz"))
    splits = {}
    for f in files:
        try:
            with np.load(f) as npz:
                splits[f.stem] = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read {f}: {err}. Re-create it: `python -m pipeline.prepare data={name}`.") from err
    missing = {"train", "val", "test"} - splits.keys()
    if missing:
        raise DataError(f"{folder} lacks split(s) {sorted(missing)}; re-run `python -m pipeline.prepare data={name}`.")
    vocab_path = folder / "vocab.txt"
    vocab = vocab_path.read_text().splitlines() if vocab_path.exists() else None
    return Dataset(splits=splits, meta=meta, vocab=vocab, digest=digest(data_root, name))


def digest(data_root: str | Path, name: str) -> str:
    """A prepared dataset's version: the digest of its split files, meta.json and vocabulary (without loading it)."""
    folder = prepared_dir(data_root, name)
    vocab = [folder / "vocab.txt"] if (folder / "vocab.txt").exists() else []
    return digest_files([*sorted(folder.glob("*.npz")), folder / "meta.json", *vocab])
