"""The adding problem (Hochreiter & Schmidhuber 1997), in the form of Le et al. (2015) and Arjovsky et al. (2016).

Each step has two channels: a value drawn uniformly from [0, 1), and a marker that is 1 at exactly two steps and 0
elsewhere, the first in the sequence's first half and the second in its second half. The target is the sum of the
two marked values; the loss is the mean squared error. Predicting 1 whatever the input scores the variance of a sum
of two uniform values, 1/6 = 0.167: a model must remember one value across up to ``length`` steps to do better.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING

from pipeline import data
from pipeline.data import Dataset
from pipeline.data.registry import DatasetSpec
from pipeline.schema import COUNT, SEED, Bound, DataConfig

BASELINE_MSE = 1 / 6  # always predicting 1: Var(U1 + U2) for two independent U(0, 1)


def generate(n: int, length: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``x`` (n, length, 2) float32: values and markers; ``y`` (n, 1) float32: the sum of the two marked values."""
    values = rng.random((n, length), dtype=np.float32)
    half = length // 2
    first = rng.integers(0, half, size=n)
    second = rng.integers(half, length, size=n)
    markers = np.zeros((n, length), dtype=np.float32)
    rows = np.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    y = (values[rows, first] + values[rows, second]).astype(np.float32)[:, None]
    return {"x": np.stack([values, markers], axis=-1), "y": y}


def build(cfg: Any, raw: Path | None = None) -> Dataset:
    """All splits from ``cfg`` (conf/data/adding.yaml), each from its own seeded stream. No raw files."""
    splits = data.generated_splits(cfg, lambda n, rng: generate(n, cfg.length, rng))
    meta = {
        "name": cfg.name,
        "kind": "regression",
        "input": "dense",
        "steps": cfg.length,
        "features": 2,  # value, marker
        "pad_value": None,  # every sequence has all its steps
        "baseline": {"metric": "mse", "value": BASELINE_MSE, "what": "always predicting 1"},
    }
    stats = {
        name: {
            "n": len(s["y"]),
            "target_mean": round(float(s["y"].mean()), 4),
            "baseline_mse": round(float(np.mean((s["y"] - 1.0) ** 2)), 4),  # near 1/6 = 0.1667
        }
        for name, s in splits.items()
    }
    return Dataset(splits=splits, meta=meta, stats=stats)


@dataclass
class AddingDataConfig(DataConfig):
    length: int = MISSING
    n_train: int = MISSING
    n_val: int = MISSING
    n_test: int = MISSING
    seed: int = MISSING


SPEC = DatasetSpec(
    source="adding",
    kind="regression",
    schema=AddingDataConfig,
    bounds={
        "length": Bound(2, 100_000, note=" (two marked steps, one in each half)"),
        "n_train": COUNT,
        "n_val": COUNT,
        "n_test": COUNT,
        "seed": SEED,
    },
    build=build,  # generated: nothing to download or verify
)
