"""Prepare stage: turn a dataset into arrays under ``data/prepared/<name>/``.

python -m pipeline.prepare data=toy
"""

from __future__ import annotations

import logging
import time
from typing import Any

import hydra
from omegaconf import DictConfig

from pipeline import config, data
from pipeline.data import toy

log = logging.getLogger(__name__)

config.register()

BUILDERS = {"toy": (toy.build, toy.stats)}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build the dataset named by ``cfg.data.name`` and write it; return its stats."""
    config.validate(cfg)
    name = cfg.data.name
    build, describe = BUILDERS[name]
    started = time.perf_counter()
    splits, meta = build(cfg.data)
    stats = describe(splits)
    out_dir = data.prepared_dir(cfg.paths.data, name)
    data.save(out_dir, splits, meta, stats)
    log.info("prepared %s in %.1f s -> %s: %s", name, time.perf_counter() - started, out_dir, stats)
    return stats


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
