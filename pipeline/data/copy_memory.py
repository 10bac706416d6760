"""The copy memory task (Hochreiter & Schmidhuber 1997), in the form of Arjovsky et al. (2016), section 4.1.

Symbols 1-8 are data, 0 is blank and 9 the delimiter. The input is 10 data symbols drawn uniformly, ``delay - 1``
blanks, the delimiter, then 10 blanks: ``delay + 20`` steps. The target is blank for ``delay + 10`` steps, then the
10 data symbols in order: the model must recall them after the delay. The loss is the cross-entropy averaged over
every step. Outputting blanks, then 8-way guesses, scores 10 log 8 / (delay + 20) without any memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING

from pipeline import data
from pipeline.data import Dataset
from pipeline.data.registry import DatasetSpec
from pipeline.schema import COUNT, SEED, Bound, DataConfig

BLANK, DELIMITER, SYMBOLS, RECALL = 0, 9, 8, 10  # ids; data symbols are 1..8; 10 of them to recall
CLASS_NAMES = ("blank", *(f"a{i}" for i in range(1, SYMBOLS + 1)), "delimiter")


def baseline_loss(delay: int) -> float:
    """The memoryless strategy's cross-entropy per step (Arjovsky et al. 2016): 10 log 8 / (delay + 20)."""
    return RECALL * math.log(SYMBOLS) / (delay + 2 * RECALL)


def generate(n: int, delay: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``x`` (n, delay + 20) int32 input symbols; ``y`` (n, delay + 20) int32 target symbols."""
    steps = delay + 2 * RECALL
    data = rng.integers(1, SYMBOLS + 1, size=(n, RECALL), dtype=np.int32)
    x = np.full((n, steps), BLANK, dtype=np.int32)
    x[:, :RECALL] = data
    x[:, delay + RECALL - 1] = DELIMITER
    y = np.full((n, steps), BLANK, dtype=np.int32)
    y[:, -RECALL:] = data
    return {"x": x, "y": y}


def build(cfg: Any, raw: Path | None = None) -> Dataset:
    """All splits from ``cfg`` (conf/data/copy_memory.yaml), each from its own seeded stream. No raw files."""
    splits = data.generated_splits(cfg, lambda n, rng: generate(n, cfg.delay, rng))
    meta = {
        "name": cfg.name,
        "kind": "tagging",
        "input": "one_hot",  # each step one of 10 symbols, fed as a one-hot vector
        "vocab_size": len(CLASS_NAMES),
        "features": len(CLASS_NAMES),  # the one-hot width each step has
        "steps": cfg.delay + 2 * RECALL,
        "pad_value": None,
        "num_classes": len(CLASS_NAMES),
        "class_names": list(CLASS_NAMES),
        "baseline": {
            "metric": "cross_entropy",
            "value": baseline_loss(cfg.delay),
            "what": "blanks, then a uniform guess among the 8 symbols",
        },
    }
    stats = {name: {"n": len(s["y"]), "steps": int(s["x"].shape[1])} for name, s in splits.items()}
    return Dataset(splits=splits, meta=meta, stats=stats)


@dataclass
class CopyMemoryDataConfig(DataConfig):
    delay: int = MISSING
    n_train: int = MISSING
    n_val: int = MISSING
    n_test: int = MISSING
    seed: int = MISSING


SPEC = DatasetSpec(
    source="copy_memory",
    kind="tagging",
    schema=CopyMemoryDataConfig,
    bounds={
        "delay": Bound(1, 100_000, note=" (blank steps between the symbols and their recall)"),
        "n_train": COUNT,
        "n_val": COUNT,
        "n_test": COUNT,
        "seed": SEED,
    },
    build=build,  # generated: nothing to download or verify
)
