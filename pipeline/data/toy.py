"""The dynamic-length toy task: tell a linear run ``k, k+1, ...`` from uniform random integers.

Each sequence has its own length (``min_len``..``max_len`` steps), so a model must ignore the right padding:
the task exists to exercise masking, not to be hard.
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
from pipeline.schema import COUNT, SEED, Bound, DataConfig, require

CLASS_NAMES = ("random", "linear")  # label 0, label 1


def generate(
    n: int, min_len: int, max_len: int, max_value: int, pad_value: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Return ``x`` (n, max_len, 1) float32 right-padded with ``pad_value``, ``y`` (n,) and ``lengths`` (n,).

    Exactly half the sequences (rounded down) are linear; the order is shuffled.
    """
    lengths = rng.integers(min_len, max_len + 1, size=n)
    y = np.zeros(n, dtype=np.int32)
    y[: n // 2] = 1
    rng.shuffle(y)
    x = np.full((n, max_len, 1), pad_value, dtype=np.float32)
    for i, (length, label) in enumerate(zip(lengths, y, strict=True)):
        if label == 1:
            start = rng.integers(0, max_value - length + 1)
            values = np.arange(start, start + length)
        else:
            values = rng.integers(0, max_value, size=length)
        x[i, :length, 0] = values / max_value
    return {"x": x, "y": y, "lengths": lengths.astype(np.int32)}


def build(cfg: Any, raw: Path | None = None) -> Dataset:
    """Generate all splits from ``cfg`` (conf/data/toy.yaml); each split has its own seeded stream. No raw files."""
    splits = data.generated_splits(
        cfg, lambda n, rng: generate(n, cfg.min_len, cfg.max_len, cfg.max_value, cfg.pad_value, rng)
    )
    meta = {
        "name": cfg.name,
        "kind": "classification",
        "input": "dense",  # real-valued steps, masked by pad_value
        "steps": cfg.max_len,
        "features": 1,
        "pad_value": cfg.pad_value,
        "num_classes": len(CLASS_NAMES),
        "class_names": list(CLASS_NAMES),
    }
    return Dataset(splits=splits, meta=meta, stats=stats(splits))


def stats(splits: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Counts, class balance and length range per split: what `dvc metrics show` prints."""
    out: dict[str, Any] = {}
    for name, s in splits.items():
        lengths = s["lengths"]
        out[name] = {
            "n": int(len(s["y"])),
            "linear_fraction": round(float(np.mean(s["y"])), 4),
            "min_len": int(lengths.min()),
            "max_len": int(lengths.max()),
            "mean_len": round(float(lengths.mean()), 3),
        }
    return out


@dataclass
class ToyDataConfig(DataConfig):
    min_len: int = MISSING
    max_len: int = MISSING
    max_value: int = MISSING
    n_train: int = MISSING
    n_val: int = MISSING
    n_test: int = MISSING
    pad_value: float = MISSING
    seed: int = MISSING


def check(cfg: Any) -> None:
    """What ranges cannot say: the lengths in order, and room below max_value for a linear run of max_len steps."""
    require(cfg.min_len <= cfg.max_len, "data.min_len", f"need 1 <= data.min_len <= data.max_len, got {cfg.min_len}")
    require(cfg.max_value > cfg.max_len, "data.max_value", "must exceed data.max_len so that a linear run fits")


SPEC = DatasetSpec(
    source="toy",
    kind="classification",
    schema=ToyDataConfig,
    bounds={
        "min_len": COUNT,
        "max_len": COUNT,
        "max_value": COUNT,
        "n_train": COUNT,
        "n_val": COUNT,
        "n_test": COUNT,
        "pad_value": Bound(high=0, high_open=True, note=" (generated values are >= 0)"),
        "seed": SEED,
    },
    check=check,
    build=build,  # generated: nothing to download or verify
)
