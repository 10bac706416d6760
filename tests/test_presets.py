"""Every preset in conf/experiment/ trains with trainer=smoke on the real (prepared) data."""

import math
from pathlib import Path

import pytest

from pipeline import download, prepare, train
from tests.conftest import CONF, compose_config, mirror_path, needs_mirror

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> Path:
    """All four datasets downloaded from the mirror and prepared once for the session."""
    root = tmp_path_factory.mktemp("real")
    for name in ("toy", "ptb", "imdb", "mnist"):
        cfg = compose_config([f"paths.root={root}", f"data={name}", f"download.mirror={mirror_path()}"])
        download.run(cfg)
        prepare.run(cfg)
    return root


def test_every_preset_states_its_source_and_expected_number():
    assert len(PRESETS) >= 10
    for name in PRESETS:
        header = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
        assert header[0] == "# @package _global_", name
        assert any(word in " ".join(header[1:4]).lower() for word in ("expect", "expected")), name


@needs_mirror
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_with_the_smoke_trainer(preset, real_data, tmp_path):
    cfg = compose_config(
        [
            f"paths.root={tmp_path}",
            f"paths.data={real_data}/data",
            f"+experiment={preset}",
            "trainer=smoke",
            "trainer.verbose=0",
            "tracking.enabled=false",
            "export=true",
        ]
    )
    result = train.run(cfg)
    metrics = result["metrics"]
    assert metrics["epochs"] == min(2, cfg.trainer.epochs)
    assert all(math.isfinite(v) for v in metrics.values())
    assert ("test/perplexity" in metrics) == (cfg.data.name == "ptb")
    assert (tmp_path / "models" / f"{cfg.data.name}.keras").exists()
