"""Prepared datasets on disk: one folder per dataset with ``<split>.npz``, ``meta.json``, ``stats.json`` and
``SHA256SUMS``, the sha256 of each of them (``sha256sum -c SHA256SUMS`` checks a folder by hand).

The prepare stage writes them; training only reads them, so the two meet at this module alone. Every file is checked
against its recorded sha256 as it is read: a damaged or swapped file is refused, never trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class DataError(RuntimeError):
    """Prepared data is missing or unreadable; the message says which command makes it."""


CHECKSUMS = "SHA256SUMS"  # in each prepared folder: `<sha256>  <file>` per line, as sha256sum writes and checks it


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


def generated_splits(cfg: Any, make: Callable[[int, np.random.Generator], dict[str, np.ndarray]]) -> dict[str, Any]:
    """A generated dataset's train, val and test splits (``cfg.n_train`` ... examples), each drawn by ``make(n,
    rng)`` from its own stream of ``cfg.seed``: a split never changes when another's size does."""
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    return {name: make(n, np.random.default_rng([cfg.seed, index])) for index, (name, n) in enumerate(sizes.items())}


def prepared_dir(data_root: str | Path, name: str) -> Path:
    return Path(data_root) / "prepared" / name


def raw_dir(data_root: str | Path, source: str) -> Path:
    """Where the download stage puts a dataset's verified raw files and the prepare stage reads them."""
    return Path(data_root) / "raw" / source


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


def json_bytes(obj: Any) -> bytes:
    """The one JSON layout of this project's files (sorted keys: the same content, the same bytes and sha256)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def save(out_dir: Path, dataset: Dataset) -> None:
    """Write every split, the vocabulary if any, ``meta.json`` and ``stats.json``, then their sha256 list: removed
    first and written last, so a folder whose prepare stopped halfway has none and is refused, not half used."""
    (out_dir / CHECKSUMS).unlink(missing_ok=True)
    sums: dict[str, str] = {}
    for name, arrays in dataset.splits.items():
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        sums[f"{name}.npz"] = write_hashed(out_dir / f"{name}.npz", buf.getvalue())
    if dataset.vocab is not None:
        sums["vocab.txt"] = write_hashed(out_dir / "vocab.txt", ("\n".join(dataset.vocab) + "\n").encode())
    sums["meta.json"] = write_hashed(out_dir / "meta.json", json_bytes(dataset.meta))
    sums["stats.json"] = write_hashed(out_dir / "stats.json", json_bytes(dataset.stats))
    atomic_write_bytes(out_dir / CHECKSUMS, "".join(f"{sums[f]}  {f}\n" for f in sorted(sums)).encode())


def write_hashed(path: Path, payload: bytes) -> str:
    """Write ``payload`` atomically; its sha256, from the bytes in hand rather than the file read back."""
    atomic_write_bytes(path, payload)
    return hashlib.sha256(payload).hexdigest()


def digest_files(paths: list[Path]) -> str:
    """sha256 over file names and contents: the data version recorded with every run."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def rebuild_hint(name: str) -> str:
    """The advice every message about a missing or damaged prepared file ends with: the DVC stage where the
    pipeline has one for this dataset, else the prepare command."""
    command = f"`python -m pipeline.prepare data={name}`"
    dvc_yaml = Path(__file__).resolve().parents[2] / "dvc.yaml"
    if dvc_yaml.exists() and f"prepare_{name}:" in dvc_yaml.read_text():
        return f"rebuild it: `dvc repro prepare_{name}` (or {command})"
    return f"rebuild it: {command}"


def checksums(folder: Path, name: str) -> dict[str, str]:
    """The sha256 per file that prepare recorded in ``folder``; a folder without them is refused (an older version
    made it, or its prepare stopped halfway), as nothing could tell a damaged file there from a sound one."""
    path = folder / CHECKSUMS
    if not path.exists() and not (folder / "meta.json").exists():
        raise DataError(
            f"no prepared data for {name!r} at {folder}. Prepare it first: "
            f"`python -m pipeline.prepare data={name}` (or `dvc repro prepare_{name}`)."
        )
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(
            f"{folder} has no {CHECKSUMS} (an older version prepared it, or its prepare stopped halfway); "
            f"{rebuild_hint(name)}."
        ) from None
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path} ({one_line(err)}); {rebuild_hint(name)}.") from err
    pairs = [line.split("  ", 1) for line in lines]
    if not all(len(pair) == 2 and len(pair[0]) == 64 for pair in pairs):
        raise DataError(f"{path} is damaged (not `<sha256>  <file>` on every line); {rebuild_hint(name)}.")
    return {file: hexdigest for hexdigest, file in pairs}


def read_verified(folder: Path, file: str, sums: dict[str, str], name: str) -> bytes:
    """A prepared file's bytes, read once and checked against the sha256 prepare recorded for it."""
    path = folder / file
    if file not in sums:
        raise DataError(
            f"{path} is not a file prepare wrote (it is not in {CHECKSUMS}): remove it, or {rebuild_hint(name)}."
        )
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} is missing (prepare wrote it, {CHECKSUMS} lists it); {rebuild_hint(name)}.") from None
    except OSError as err:
        raise DataError(f"cannot read {path} ({one_line(err)}); {rebuild_hint(name)}.") from err
    actual = hashlib.sha256(payload).hexdigest()
    if actual != sums[file]:
        raise DataError(
            f"{path} is damaged (sha256 {actual[:16]}..., but {CHECKSUMS} recorded {sums[file][:16]}...); "
            f"{rebuild_hint(name)}."
        )
    return payload


def parse(path: Path, payload: bytes, name: str) -> Any:
    """A verified file's content: a split's arrays, meta.json's object or the vocabulary's words (a file that
    matches its sha256 yet does not parse was written so: rebuilding it is still the fix)."""
    try:
        if path.suffix == ".npz":
            with np.load(io.BytesIO(payload)) as npz:
                return {k: npz[k] for k in npz.files}
        if path.name == "meta.json":
            meta = json.loads(payload)
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            return meta
        return payload.decode().splitlines()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # BadZipFile is not an OSError
        raise DataError(f"cannot read {path} ({one_line(err)}); {rebuild_hint(name)}.") from err


def one_line(err: BaseException) -> str:
    """An error's text on one line: every message here is one log line."""
    return " ".join(str(err).split())


def load_meta(data_root: str | Path, name: str) -> dict[str, Any]:
    """A prepared dataset's ``meta.json`` (what a model needs to know), checked against its recorded sha256, or
    say which command prepares it."""
    folder = prepared_dir(data_root, name)
    payload = read_verified(folder, "meta.json", checksums(folder, name), name)
    return parse(folder / "meta.json", payload, name)


def load(data_root: str | Path, name: str) -> Dataset:
    """Load a prepared dataset, every file checked against its recorded sha256, or say which command prepares it.
    Each file is read once: its bytes are hashed, parsed and fed to the digest (the 170 MB of MNIST's train split
    would otherwise be read twice)."""
    folder = prepared_dir(data_root, name)
    sums = checksums(folder, name)
    version = hashlib.sha256()
    content: dict[str, Any] = {}
    for file in files_to_load(folder, sums):
        payload = read_verified(folder, file, sums, name)
        version.update(file.encode() + b"\0")  # as digest_files does: the same version as digest()
        version.update(payload)
        content[file] = parse(folder / file, payload, name)
    splits = {file.removesuffix(".npz"): arrays for file, arrays in content.items() if file.endswith(".npz")}
    missing = {"train", "val", "test"} - splits.keys()
    if missing:
        raise DataError(f"{folder} lacks split(s) {sorted(missing)}; {rebuild_hint(name)}.")
    meta, vocab = content["meta.json"], content.get("vocab.txt")
    return Dataset(splits=splits, meta=meta, vocab=vocab, digest=version.hexdigest())


def files_to_load(folder: Path, sums: dict[str, str]) -> list[str]:
    """What ``load`` reads, in ``digest``'s order: the splits and meta.json and vocabulary (recorded or present; a
    recorded one that is gone is reported missing, a present one not recorded is refused), never stats.json."""
    present = {p.name for p in folder.glob("*.npz")} | ({"vocab.txt"} if (folder / "vocab.txt").exists() else set())
    return sorted(present | {"meta.json"} | (sums.keys() - {"stats.json"}))


def digest(data_root: str | Path, name: str) -> str:
    """A prepared dataset's version: the digest of its split files, meta.json and vocabulary (without loading it)."""
    folder = prepared_dir(data_root, name)
    vocab = [folder / "vocab.txt"] if (folder / "vocab.txt").exists() else []
    return digest_files([*sorted(folder.glob("*.npz")), folder / "meta.json", *vocab])
