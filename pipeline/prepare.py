"""Prepare stage: turn a dataset's raw files into arrays under ``data/prepared/<name>/``.

python -m pipeline.prepare data=toy     # generated, no download
python -m pipeline.prepare data=mnist   # reads data/raw/mnist (the download stage's output)

Raw files are verified again before anything is built (sha256 against the known digests, or for IMDB the digest the
download stage recorded): a file damaged or replaced since the download is refused, never built from silently.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import config, data
from pipeline.data import imdb, mnist, ptb, toy
from pipeline.data.fetch import DownloadError
from pipeline.download import raw_dir

log = logging.getLogger(__name__)

config.register()

BUILDERS = {"toy": toy.build, "ptb": ptb.build, "imdb": imdb.build, "mnist": mnist.build}
VERIFIERS = {"ptb": ptb.verify, "imdb": imdb.verify, "mnist": mnist.verify}  # raise DataError on unverified raw files


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build the dataset ``cfg.data`` describes and write it; return its stats."""
    config.validate(cfg, "prepare")
    started = time.perf_counter()
    raw = raw_dir(cfg)
    if cfg.data.source != "toy" and not raw.exists():
        raise data.DataError(
            f"no raw files at {raw}. Download them first: `python -m pipeline.download data={cfg.data.name}` "
            f"(or `dvc repro download_{cfg.data.source}`)."
        )
    if cfg.data.source in VERIFIERS:
        VERIFIERS[cfg.data.source](raw)
    dataset = BUILDERS[cfg.data.source](cfg.data, raw)
    out_dir = data.prepared_dir(cfg.paths.data, cfg.data.name)
    dataset.meta["config"] = OmegaConf.to_container(cfg.data, resolve=True)  # training checks its data.* against it
    data.save(out_dir, dataset)
    log.info("prepared %s in %.1f s -> %s: %s", cfg.data.name, time.perf_counter() - started, out_dir, dataset.stats)
    return dataset.stats


@hydra.main(config_path="../conf", config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (data.DataError, DownloadError) as err:
        log.error("%s", err)  # a missing or unverified input: the message says what to run, no traceback
        sys.exit(1)


if __name__ == "__main__":
    main()
