"""The dashboard command (make ui): the same store that training writes to, on this machine only."""

import sys

import pytest

from pipeline import config, ui
from tests.conftest import compose_config


def test_the_dashboard_reads_the_store_training_writes_to(make_cfg, tmp_path):
    cfg = make_cfg(top="ui")
    assert cfg.tracking.uri == make_cfg().tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert ui.command(cfg) == [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--host",
        "127.0.0.1",
        "--port",
        "5000",
    ]
    assert ui.command(make_cfg("ui.port=5050", top="ui"))[-2:] == ["--port", "5050"]


def test_a_port_out_of_range_is_refused():
    """conf/ui.yaml names no dataset: its tracking.experiment (rnnlab-${data.name}) is not resolved in checking."""
    with pytest.raises(config.ConfigError, match=r"^ui\.port: must be in \[1, 65535\], got 70000"):
        config.validate(compose_config(["ui.port=70000"], config_name="ui"), "ui")
