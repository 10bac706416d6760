"""Every preset in conf/experiment/ states what to expect, and trains with budget=smoke on the real (prepared) data
(the integration tier: the mirror's datasets, downloaded and prepared once per session)."""

import itertools
import math
from pathlib import Path

import pytest

from pipeline import download, prepare, train
from tests.conftest import CONF, compose_config, mirror_path, needs_mirror

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> Path:
    """Every dataset the presets read, downloaded from the mirror and prepared once for the session."""
    root = tmp_path_factory.mktemp("real")
    for name in sorted(p.stem for p in (CONF / "data").glob("*.yaml")):  # every dataset and variant
        overrides = [f"paths.root={root}", f"data={name}", f"download.mirror={mirror_path()}"]
        cfg = compose_config(overrides, config_name="download")
        download.run(cfg)
        prepare.run(cfg)
    return root


def test_every_preset_states_its_source_and_expected_number():
    assert len(PRESETS) >= 10
    for name in PRESETS:
        lines = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
        assert lines[0] == "# @package _global_", name
        header = " ".join(itertools.takewhile(lambda line: line.startswith("#"), lines[1:])).lower()
        assert "expect" in header, f"{name}: its header comment says nothing of what to expect"


@needs_mirror
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_with_the_smoke_trainer(preset, real_data, tmp_path):
    cfg = compose_config(
        [
            f"paths.root={tmp_path}",
            f"paths.data={real_data}/data",
            f"experiment={preset}",
            "budget=smoke",
            "trainer.verbose=0",
            "tracking.enabled=false",
            "export=true",
            # the 650/1,500-unit presets: Keras' loops (XLA compiling their fused loops costs CI a minute; the
            # fused kernels run in the ptb_small/ptb_quick smoke runs and tests/test_kernels.py)
            *(["trainer.kernels=keras"] if preset in ("ptb_medium", "ptb_large") else []),
        ]
    )
    result = train.run(cfg)
    metrics = result["metrics"]
    assert metrics["epochs"] == min(2, cfg.trainer.epochs)
    assert all(math.isfinite(v) for v in metrics.values())
    assert ("test/perplexity" in metrics) == (cfg.data.name == "ptb")
    assert (tmp_path / "models" / f"{cfg.data.name}.keras").exists()
