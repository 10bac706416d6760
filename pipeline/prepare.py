"""Prepare stage: turn a dataset's raw files into arrays under ``data/prepared/<name>/``.

python -m pipeline.prepare data=toy     # generated, no download
python -m pipeline.prepare data=mnist   # reads data/raw/mnist (the download stage's output)

Raw files are verified again before anything is built (sha256 against the known digests, or for IMDB the digest the
download stage recorded): a file damaged or replaced since the download is refused, never built from silently. The
work itself is ``pipeline.data.registry.prepare``, which the benchmark also times; this stage validates and runs it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from pipeline import config, data
from pipeline.data import registry
from pipeline.data.fetch import DownloadError

log = logging.getLogger(__name__)

config.register()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build the dataset ``cfg.data`` describes and write it; return its stats."""
    config.validate(cfg, "prepare")
    return registry.prepare(cfg)


@hydra.main(config_path="../conf", config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (data.DataError, DownloadError, config.ConfigError) as err:
        log.error("%s", err)  # a missing or unverified input: the message says what to run, no traceback
        sys.exit(1)


if __name__ == "__main__":
    main()
