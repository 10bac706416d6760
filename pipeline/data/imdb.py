"""IMDB movie-review sentiment (Maas et al. 2011): fetch, verify by content, tokenise, pad.

The canonical ``aclImdb_v1.tar.gz`` is verified by its sha256. A mirror may repack the reviews into other archives,
so what is finally checked is the *content digest* of the 50,000 labelled reviews, the same for any faithful copy.
The verified archive itself is the raw output; reviews are streamed from it, never extracted.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import Dataset, split_off
from pipeline.data.fetch import DownloadError, Source, fetch, give_up, mirror_source

log = logging.getLogger(__name__)

URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
ARCHIVE = "aclImdb_v1.tar.gz"
ARCHIVE_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
REPACK = "aclImdb_labeled.tar.gz"  # a mirror's archive of the labelled part alone
RAW_NAME = "reviews.tar.gz"  # the verified archive as kept under data/raw/imdb/
# sha256 over the sorted lines "aclImdb/<split>/<pos|neg>/<file>\t<sha256 of file>\n", split in train, test.
CONTENT_DIGEST = "3a1bc6867d44017fb0273b44da36c399b999e7fd0427c388b57c67358d440db0"
SPLITS, LABELS = ("train", "test"), ("neg", "pos")  # label id = position: neg 0, pos 1


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


def download(out: Path, mirror: str | None, timeout: float) -> list[Path]:
    """Put a verified archive of the reviews at ``out/reviews.tar.gz``: the mirror's canonical archive or its
    repack of the labelled reviews, else the canonical archive from the host."""
    target = out / RAW_NAME
    if target.exists():
        try:
            check_content(target)
            log.info("%s: present and verified", target)
            return [target]
        except DownloadError as err:
            log.warning("%s fails verification (%s): fetching it again", target, err)
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
            return [fetch(target, [source], sha256=sha, timeout=timeout, check=check_content)]
        except DownloadError as err:
            failures.extend(err.failures)
    raise give_up("IMDB reviews", failures)


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
