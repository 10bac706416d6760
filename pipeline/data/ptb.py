"""Penn Treebank, word level (Mikolov's "simple-examples" split): fetch, verify, build the vocabulary, encode.

The text is already lower-cased with numbers as ``N`` and rare words as ``<unk>``; we add ``<eos>`` at each line
end, as the TF tutorial's reader does, giving 929,589 / 73,760 / 82,430 tokens and exactly 10,000 words.
"""

from __future__ import annotations

import collections
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING

from pipeline.data import Dataset
from pipeline.data.fetch import (
    DownloadError,
    Source,
    fetch,
    give_up,
    mirror_source,
    require_sha256,
    safe_extract,
    verify_present,
)
from pipeline.data.registry import DatasetSpec
from pipeline.schema import Bound, DataConfig

log = logging.getLogger(__name__)

ARCHIVE_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
# split -> (file name, sha256); the same bytes as data/ptb.*.txt inside the canonical archive.
FILES = {
    "train": ("ptb.train.txt", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
    "val": ("ptb.valid.txt", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
    "test": ("ptb.test.txt", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
}
EXPECTED_TOKENS = {"train": 929_589, "val": 73_760, "test": 82_430}
EOS, UNK = "<eos>", "<unk>"


def download(out: Path, mirror: str | None, timeout: float) -> list[Path]:
    """Put the three verified text files in ``out``: from the mirror's copies, else from the canonical archive.

    Files present that fail verification are deleted first, so a failed download leaves them missing, not corrupt.
    """
    wanted = {name: sha for name, sha in FILES.values()}
    missing = {name: sha for name, sha in wanted.items() if not verify_present(out / name, sha)}
    mirror_errors = []
    for name, sha in list(missing.items()):
        source = mirror_source(mirror, "ptb", name)
        if source is None:
            break
        try:
            fetch(out / name, [source], sha256=sha, timeout=timeout)
            del missing[name]
        except DownloadError as err:
            mirror_errors.extend(err.failures)
    if missing:
        _from_archive(out, missing, mirror, timeout, mirror_errors)
    return [out / name for name in wanted]


def _member_picker(names: list[str]):
    """Map the archive's ``./simple-examples/data/<name>`` members to ``<name>``; skip everything else."""
    suffixes = {f"data/{name}": name for name in names}

    def pick(member: str) -> str | None:
        return next((name for suffix, name in suffixes.items() if member.endswith(suffix)), None)

    return pick


def _from_archive(out: Path, missing: dict[str, str], mirror: str | None, timeout: float, errors: list[str]) -> None:
    sources = [s for s in (mirror_source(mirror, "ptb", "simple-examples.tgz"), Source(ARCHIVE_URL)) if s]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        try:
            archive = fetch(Path(tmp) / "simple-examples.tgz", sources, timeout=timeout)
        except DownloadError as err:
            raise give_up("PTB text files", [*errors, *err.failures]) from err
        staged = Path(tmp) / "files"
        safe_extract(archive, staged, _member_picker(list(missing)))
        for name, sha in missing.items():
            fetch(out / name, [Source(str(staged / name))], sha256=sha, timeout=timeout)


def verify(raw: Path) -> None:
    """Raise DataError unless the three text files in ``raw`` have their canonical sha256 (about 0.05 s)."""
    for name, sha in FILES.values():
        require_sha256(raw / name, sha, "ptb")


def read_words(path: Path) -> list[str]:
    """The file's words with ``<eos>`` closing every line."""
    with open(path, encoding="utf-8") as fh:
        return [word for line in fh for word in [*line.split(), EOS]]


def build_vocab(words: list[str], size: int) -> list[str]:
    """The ``size`` most frequent words, most frequent first, ties broken alphabetically: id = position."""
    counts = collections.Counter(words)
    if UNK not in counts:
        counts[UNK] = 0
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    vocab = [word for word, _ in ranked[:size]]
    if UNK not in vocab:
        vocab[-1] = UNK  # always keep a slot for unknown words
    return vocab


def encode(words: list[str], vocab: list[str]) -> np.ndarray:
    index = {word: i for i, word in enumerate(vocab)}
    unk = index[UNK]
    return np.array([index.get(word, unk) for word in words], dtype=np.int32)


def build(cfg: Any, raw: Path) -> Dataset:
    """Vocabulary from train, each split one long id stream; checks the canonical token counts."""
    words = {split: read_words(raw / name) for split, (name, _) in FILES.items()}
    vocab = build_vocab(words["train"], cfg.vocab_size)
    splits = {split: {"ids": encode(w, vocab)} for split, w in words.items()}
    if cfg.vocab_size == 10_000:
        counts = {split: len(w) for split, w in words.items()}
        if counts != EXPECTED_TOKENS:
            raise ValueError(
                f"PTB token counts {counts} differ from the canonical {EXPECTED_TOKENS}: corrupt raw files?"
            )
    meta = {
        "name": cfg.name,
        "kind": "language_model",
        "input": "tokens",
        "vocab_size": len(vocab),
        "eos_id": vocab.index(EOS),
        "unk_id": vocab.index(UNK),
    }
    unk_id = meta["unk_id"]
    stats = {
        split: {"tokens": int(len(s["ids"])), "unk_fraction": round(float(np.mean(s["ids"] == unk_id)), 5)}
        for split, s in splits.items()
    }
    stats["vocab_size"] = len(vocab)
    return Dataset(splits=splits, meta=meta, stats=stats, vocab=vocab)


@dataclass
class PTBDataConfig(DataConfig):
    vocab_size: int = MISSING


SPEC = DatasetSpec(
    source="ptb",
    kind="language_model",
    schema=PTBDataConfig,
    bounds={"vocab_size": Bound(3, note=" (<eos>, <unk> and a word)")},
    download=download,
    verify=verify,
    build=build,
)
