"""MNIST read row by row: each 28x28 image becomes a 28-step sequence of 28-pixel rows; or pixel by pixel, 784
steps of one pixel, in reading order (sequential MNIST) or in a fixed random order (permuted MNIST).

Fetched as the four original IDX ``.gz`` files and verified by sha256; the IDX headers (magic number, dimensions)
are checked before any pixel is trusted.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING

from pipeline.data import Dataset, split_off
from pipeline.data.fetch import Source, fetch, mirror_source, require_sha256
from pipeline.data.registry import DatasetSpec
from pipeline.schema import SEED, Bound, DataConfig, require

# Canonical host first, then the copy torchvision uses (the canonical host often refuses scripted downloads).
URL_BASES = ("https://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/")
FILES = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
ROWS = 28  # an image is ROWS x ROWS pixels
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # 0x00000803: unsigned bytes, 3 dims; 0x00000801: 1 dim


class IDXError(ValueError):
    """A file is not the IDX file it claims to be."""


def download(out: Path, mirror: str | None, timeout: float) -> list[Path]:
    """Fetch the four files, each from the mirror, then the canonical host, then the fallback host (a file
    present that fails verification is deleted first, whether or not a source then supplies it)."""
    paths = []
    for name, sha in FILES.items():
        sources = [s for s in (mirror_source(mirror, "mnist", name), *(Source(b + name) for b in URL_BASES)) if s]
        paths.append(fetch(out / name, sources, sha256=sha, timeout=timeout))
    return paths


def verify(raw: Path) -> None:
    """Raise DataError unless the four files in ``raw`` have their canonical sha256 (about 0.1 s)."""
    for name, sha in FILES.items():
        require_sha256(raw / name, sha, "mnist")


def read_idx(path: Path) -> np.ndarray:
    """Parse a (gzipped) IDX file of unsigned bytes; 2051 = images (n, rows, cols), 2049 = labels (n,)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        payload = fh.read()
    if len(payload) < 8:
        raise IDXError(f"{path.name}: too short for an IDX header ({len(payload)} bytes)")
    (magic,) = struct.unpack(">i", payload[:4])
    if magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        raise IDXError(f"{path.name}: magic number {magic} is neither {IMAGES_MAGIC} (images) nor {LABELS_MAGIC}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}i", payload[4:header])
    expected = int(np.prod(dims))
    if len(payload) - header != expected:
        raise IDXError(f"{path.name}: header promises {dims} = {expected} bytes, found {len(payload) - header}")
    return np.frombuffer(payload, dtype=np.uint8, offset=header).reshape(dims)


def _pair(raw: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(raw / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise IDXError(f"{prefix}: images {images.shape} and labels {labels.shape} do not pair up")
    return images, labels


def build(cfg: Any, raw: Path) -> Dataset:
    """Pixels scaled to [0, 1]; validation held out of train only (seeded); test untouched."""
    train_x, train_y = _pair(raw, "train")
    test_x, test_y = _pair(raw, "t10k")
    keep, held = split_off(train_y, cfg.val_size, cfg.seed)

    def arrays(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        return {"x": x.astype(np.float32) / 255.0, "y": y.astype(np.int32)}

    splits = {
        "train": arrays(train_x[keep], train_y[keep]),
        "val": arrays(train_x[held], train_y[held]),
        "test": arrays(test_x, test_y),
    }
    order = pixel_order(cfg)
    if order is not None:  # one pixel a step, in the fixed (possibly permuted) order
        for s in splits.values():
            s["x"] = s["x"].reshape(len(s["x"]), -1)[:, order, None]
    steps, features = splits["train"]["x"].shape[1:]
    meta = {
        "name": cfg.name,
        "kind": "classification",
        "input": "dense",  # each step is one row of 28 pixels, or one pixel
        "steps": int(steps),
        "features": int(features),
        "order": cfg.order,
        # The permutation itself, so the data version names it (None: rows, or pixels in reading order).
        "permutation": None if cfg.permutation_seed is None else order.tolist(),
        "pad_value": None,  # every sequence has all 28 steps: nothing to mask
        "num_classes": 10,
        "class_names": [str(d) for d in range(10)],
    }
    stats = {
        split: {
            "n": int(len(s["y"])),
            "class_counts": np.bincount(s["y"], minlength=10).tolist(),
            "pixel_mean": round(float(s["x"].mean()), 5),
        }
        for split, s in splits.items()
    }
    return Dataset(splits=splits, meta=meta, stats=stats)


def pixel_order(cfg: Any) -> np.ndarray | None:
    """The order in which the pixels are read, one a step; None for rows (28 steps of 28 pixels).

    ``order: pixels`` reads the 784 pixels row by row (sequential MNIST); with ``permutation_seed`` they come in a
    fixed random order, the same for every image (permuted MNIST, Le et al. 2015)."""
    if cfg.order == "rows":
        return None
    pixels = np.arange(ROWS * ROWS)
    if cfg.permutation_seed is None:
        return pixels
    return np.random.default_rng(cfg.permutation_seed).permutation(pixels)


@dataclass
class MNISTDataConfig(DataConfig):
    val_size: int = MISSING
    seed: int = MISSING
    order: str = MISSING
    permutation_seed: int | None = MISSING


def check(cfg: Any) -> None:
    """A permutation reorders pixels: with rows it would have nothing to permute."""
    require(
        cfg.permutation_seed is None or cfg.order == "pixels",
        "data.permutation_seed",
        f"permutes the pixels of order=pixels; with order={cfg.order} set it to null",
    )


SPEC = DatasetSpec(
    source="mnist",
    kind="classification",
    schema=MNISTDataConfig,
    bounds={
        "val_size": Bound(1, 59_999, note=" (out of 60,000 training images)"),
        "seed": SEED,
        "permutation_seed": Bound(0, SEED.high, nullable=True, note=" (null: pixels in reading order)"),
    },
    choices={"order": ("pixel order", ("rows", "pixels"))},
    check=check,
    download=download,
    verify=verify,
    build=build,
)
