"""Shared fixtures: real Hydra composition with every output path inside a temporary folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.pop("RNNLAB_ROOT", None)

from pipeline import config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

config.register()


def compose_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` exactly as the command line would, with these overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=list(overrides or []))


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose a config whose data, reports, models and MLflow store all live under ``tmp_path``."""

    def make(*overrides: str) -> DictConfig:
        return compose_config([f"paths.root={tmp_path}", "trainer.verbose=0", *overrides])

    return make


def mirror_path() -> Path | None:
    """The verified dataset mirror beside the checkout (../shared/datasets), or $RNNLAB_DATA_MIRROR."""
    candidate = Path(os.environ.get("RNNLAB_DATA_MIRROR") or REPO.parent / "shared" / "datasets")
    return candidate if (candidate / "MANIFEST.md").exists() else None


needs_mirror = pytest.mark.skipif(mirror_path() is None, reason="no dataset mirror at ../shared/datasets")
