"""IMDB movie-review sentiment (Maas et al. 2011): fetch, verify by content, tokenise, pad.

The canonical ``aclImdb_v1.tar.gz`` is verified by its sha256. A mirror may repack the reviews into other archives,
so what is finally checked is the *content digest* of the 50,000 labelled reviews, the same for any faithful copy.
The verified archive itself is the raw output; reviews are streamed from it, never extracted.

The content digest costs seconds, so once it passes the download stage records the archive's sha256 beside it
(``VERIFIED.sha256``, one deterministic ``sha256sum`` line). Later downloads and the prepare stage then verify the
archive by its sha256 alone (a fraction of a second): the canonical archive's, or the recorded one.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING

from pipeline.data import DataError, Dataset, atomic_write_bytes, split_off
from pipeline.data.fetch import (
    DownloadError,
    Source,
    download_hint,
    fetch,
    give_up,
    mirror_source,
    sha256_file,
    verify_present,
)
from pipeline.data.registry import DatasetSpec
from pipeline.schema import COUNT, SEED, Bound, DataConfig

log = logging.getLogger(__name__)

URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
ARCHIVE = "aclImdb_v1.tar.gz"
ARCHIVE_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
REPACK = "aclImdb_labeled.tar.gz"  # a mirror's archive of the labelled part alone
RAW_NAME = "reviews.tar.gz"  # the verified archive as kept under data/raw/imdb/
RECORD_NAME = "VERIFIED.sha256"  # "<sha256>  reviews.tar.gz": written only once the archive passed check_content
# sha256 over the sorted lines "aclImdb/<split>/<pos|neg>/<file>\t<sha256 of file>\n", split in train, test.
CONTENT_DIGEST = "3a1bc6867d44017fb0273b44da36c399b999e7fd0427c388b57c67358d440db0"
SPLITS, LABELS = ("train", "test"), ("neg", "pos")  # label id = position: neg 0, pos 1
TRUNCATE = ("pre", "post")  # a long review keeps its end (pre) or its start (post)
STANDARDIZE = ("lower_and_strip_punctuation", "lower", "strip_punctuation")  # TextVectorization's own names


def labelled_member(member: str) -> tuple[str, int] | None:
    """(split, label id) of a labelled review's archive member name, or None for anything else."""
    parts = member.removeprefix("./").split("/")
    if (
        len(parts) == 4
        and parts[0] == "aclImdb"
        and parts[1] in SPLITS
        and parts[2] in LABELS
        and parts[3].endswith(".txt")
    ):
        return parts[1], LABELS.index(parts[2])
    return None


def iter_reviews(archive: Path) -> Iterator[tuple[str, str, int, bytes]]:
    """(member name, split, label, raw bytes) of each labelled review, streamed from the archive (no extraction:
    50,000 small files would cost more to write, hash and track than the reviews themselves)."""
    with tarfile.open(archive) as tar:
        for member in tar:
            found = labelled_member(member.name) if member.isfile() else None
            if found:
                yield member.name.removeprefix("./"), *found, tar.extractfile(member).read()


def content_digest(archive: Path) -> str:
    """The digest of the labelled reviews inside ``archive``, whatever else it holds and however it is packed."""
    lines = sorted(f"{name}\t{hashlib.sha256(payload).hexdigest()}\n" for name, _, _, payload in iter_reviews(archive))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def check_content(archive: Path) -> None:
    """Raise DownloadError unless ``archive`` holds exactly the 50,000 canonical labelled reviews."""
    try:
        actual = content_digest(archive)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DownloadError(f"not a readable tar archive ({err})") from err
    if actual != CONTENT_DIGEST:
        raise DownloadError(f"content digest mismatch: expected {CONTENT_DIGEST}, got {actual}")


def recorded_sha256(raw: Path) -> str | None:
    """The sha256 the download stage recorded for the archive whose content it checked, or None."""
    try:
        fields = (raw / RECORD_NAME).read_text().split()
    except FileNotFoundError:
        return None
    return fields[0] if len(fields) == 2 and fields[1] == RAW_NAME else None


def _record(raw: Path, archive: Path) -> None:
    """Record the sha256 of an archive that just passed the content check (same bytes, same line: DVC no-op)."""
    line = f"{sha256_file(archive)}  {RAW_NAME}\n".encode()
    record = raw / RECORD_NAME
    if not record.exists() or record.read_bytes() != line:
        atomic_write_bytes(record, line)


def download(out: Path, mirror: str | None, timeout: float) -> list[Path]:
    """Put a verified archive of the reviews at ``out/reviews.tar.gz``: the mirror's canonical archive or its
    repack of the labelled reviews, else the canonical archive from the host. An archive present that fails
    verification is deleted first, so a failed download leaves it missing, never corrupt."""
    target = out / RAW_NAME
    if target.exists() and sha256_file(target) in {ARCHIVE_SHA256, recorded_sha256(out)}:
        log.info("%s: present and verified", target)
        return [target]
    if verify_present(target, check=check_content):  # verified before records existed: record it now
        log.info("%s: present and verified by content", target)
        _record(out, target)
        return [target]
    (out / RECORD_NAME).unlink(missing_ok=True)
    candidates = [
        (mirror_source(mirror, "imdb", ARCHIVE), ARCHIVE_SHA256),
        (mirror_source(mirror, "imdb", REPACK), None),
        (Source(URL), ARCHIVE_SHA256),
    ]
    failures: list[str] = []
    for source, sha in candidates:
        if source is None:
            continue
        try:
            fetch(target, [source], sha256=sha, timeout=timeout, check=check_content)
        except DownloadError as err:
            failures.extend(err.failures)
            continue
        _record(out, target)
        return [target]
    raise give_up("IMDB reviews", failures)


def verify(raw: Path) -> None:
    """Raise DataError unless ``raw/reviews.tar.gz`` is verified: its sha256 is the canonical archive's or the one
    the download stage recorded after the content check (about 0.3 s). Only without such a match is the content
    digest recomputed (seconds), so an archive verified before records existed still passes."""
    archive = raw / RAW_NAME
    if not archive.exists():
        raise DataError(f"raw file {archive} is missing. {download_hint('imdb')}")
    actual, recorded = sha256_file(archive), recorded_sha256(raw)
    if actual in {ARCHIVE_SHA256, recorded}:
        return
    try:
        check_content(archive)
    except DownloadError as err:
        raise DataError(
            f"raw file {archive} is not verified: expected sha256 {ARCHIVE_SHA256} (the canonical archive) or "
            f"{recorded or '(none recorded)'} (recorded by the download stage), got {actual}; content check: {err}. "
            f"{download_hint('imdb')}"
        ) from err
    log.info("%s: verified by content (no download record matches it)", archive)


def read_reviews(archive: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """Texts (``<br />`` replaced by a space) and labels per split, in member-name order."""
    rows = sorted(iter_reviews(archive))
    out = {}
    for split in SPLITS:
        chosen = [(label, payload) for _, s, label, payload in rows if s == split]
        texts = [payload.decode("utf-8").replace("<br />", " ") for _, payload in chosen]
        out[split] = (texts, np.array([label for label, _ in chosen], dtype=np.int32))
    return out


def pad(sequences: list[np.ndarray], max_len: int, truncate: str) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad with 0 to ``max_len``; a longer sequence keeps its last (``pre``) or first (``post``) tokens."""
    x = np.zeros((len(sequences), max_len), dtype=np.int32)
    lengths = np.zeros(len(sequences), dtype=np.int32)
    for i, seq in enumerate(sequences):
        kept = seq[-max_len:] if truncate == "pre" else seq[:max_len]
        x[i, : len(kept)] = kept
        lengths[i] = len(kept)
    return x, lengths


def tokenizer(texts: list[str], vocab_size: int, standardize: str):
    """Keras' TextVectorization adapted on ``texts``: id 0 = padding, 1 = out-of-vocabulary, then by frequency."""
    import keras

    vectorizer = keras.layers.TextVectorization(
        max_tokens=vocab_size, standardize=standardize, split="whitespace", output_mode="int", ragged=True
    )
    vectorizer.adapt(texts, batch_size=1024)
    return vectorizer


def encode(vectorizer, texts: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """Token ids per text, and each text's full length before truncation."""
    ragged = vectorizer(texts)
    flat, lengths = ragged.flat_values.numpy(), ragged.row_lengths().numpy()
    return np.split(flat.astype(np.int32), np.cumsum(lengths)[:-1]), lengths


def build(cfg: Any, raw: Path) -> Dataset:
    """Train 25,000 minus a seeded validation split, test 25,000; vocabulary from the training part alone."""
    reviews = read_reviews(raw / RAW_NAME)
    (train_texts, train_y), (test_texts, test_y) = reviews["train"], reviews["test"]
    keep, held = split_off(train_y, cfg.val_size, cfg.seed)
    texts = {
        "train": [train_texts[i] for i in keep],
        "val": [train_texts[i] for i in held],
        "test": test_texts,
    }
    labels = {"train": train_y[keep], "val": train_y[held], "test": test_y}
    vectorizer = tokenizer(texts["train"], cfg.vocab_size, cfg.standardize)
    splits, stats = {}, {}
    for split, split_texts in texts.items():
        sequences, full_lengths = encode(vectorizer, split_texts)
        x, lengths = pad(sequences, cfg.max_len, cfg.truncate)
        splits[split] = {"x": x, "y": labels[split], "lengths": lengths}
        stats[split] = {
            "n": len(split_texts),
            "positive_fraction": round(float(labels[split].mean()), 4),
            "mean_tokens": round(float(full_lengths.mean()), 1),
            "truncated_fraction": round(float(np.mean(full_lengths > cfg.max_len)), 4),
            "oov_fraction": round(float(np.mean(x[x > 0] == 1)), 4),
        }
    vocab = [str(token) or "<pad>" for token in vectorizer.get_vocabulary()]
    stats["vocab_size"] = len(vocab)
    meta = {
        "name": cfg.name,
        "kind": "classification",
        "input": "tokens",
        "steps": cfg.max_len,
        "vocab_size": len(vocab),
        "num_classes": 2,
        "class_names": list(LABELS),
    }
    return Dataset(splits=splits, meta=meta, stats=stats, vocab=vocab)


@dataclass
class IMDBDataConfig(DataConfig):
    vocab_size: int = MISSING
    max_len: int = MISSING
    truncate: str = MISSING
    standardize: str = MISSING
    val_size: int = MISSING
    seed: int = MISSING


SPEC = DatasetSpec(
    source="imdb",
    kind="classification",
    schema=IMDBDataConfig,
    bounds={
        "vocab_size": Bound(3, note=" (padding, out-of-vocabulary and a word)"),
        "max_len": COUNT,
        "val_size": Bound(1, 24_999, note=" (out of 25,000 training reviews)"),
        "seed": SEED,
    },
    choices={"truncate": ("truncation", TRUNCATE), "standardize": ("standardisation", STANDARDIZE)},
    download=download,
    verify=verify,
    build=build,
)
