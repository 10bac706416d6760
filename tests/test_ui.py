"""The dashboard command (make ui): the same store that training writes to, on this machine only."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline import config, prepare, ui
from tests.conftest import REPO, compose_config, in_ci
from tests.test_sweeps import SMALL, multirun, sweep_runs


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


# --- In a real browser -----------------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dashboard(root: Path, port: int):
    """``python -m pipeline.ui`` on the store under ``root``, until it answers; stopped on the way out."""
    cmd = [sys.executable, "-m", "pipeline.ui", f"paths.root={root}", f"ui.port={port}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError(f"the dashboard did not start: {proc.stdout.read() if proc.poll() else ''}")
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.integration
@pytest.mark.skipif(CHROMIUM is None and not in_ci(), reason="no chromium: apt-get install chromium")
def test_the_runs_table_of_a_seeded_sweep_shows_parent_children_and_datasets(make_cfg, tmp_path):
    """As a new user opens it (`make ui`, MLflow 3.17, headless Chromium): the training runs table, the sweep's
    parent with its children under it, each child's Dataset cell filled with the prepared splits."""
    from playwright.sync_api import sync_playwright

    prepare.run(make_cfg(*SMALL))
    multirun(tmp_path, "model=rnn,gru", "seeds=2", "tracking.sweep_name=seeded", "hydra/launcher=parallel")
    client, (parent,), children = sweep_runs(tmp_path)
    port = free_port()
    cfg = make_cfg(f"ui.port={port}", top="ui")
    (link,) = ui.experiment_links(cfg)
    assert link == f"  rnnlab-toy: {ui.runs_url(cfg, parent.info.experiment_id)}"
    with dashboard(tmp_path, port), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.goto(ui.runs_url(cfg, parent.info.experiment_id))
        page.wait_for_selector("text=seeded", timeout=60_000)
        assert "/runs" in page.url and "Detect Issues" not in page.inner_text("body")  # not the GenAI overview
        page.locator("[role=row]", has_text="seeded").locator("button").first.click()  # expand the parent
        for child in children:
            page.wait_for_selector(f"text={child.info.run_name}", timeout=30_000)
        page.screenshot(path=str(tmp_path / "runs_table.png"))
        for child in children:  # the grid splits a row into its pinned and scrolling parts: read them all
            index = page.locator("[role=row]", has_text=child.info.run_name).first.get_attribute("row-index")
            row = " ".join(page.locator(f'[role=row][row-index="{index}"]').all_inner_texts())
            assert "toy." in row, row  # the Dataset column: toy.train, toy.val, toy.test
        browser.close()
    assert (tmp_path / "runs_table.png").stat().st_size > 20_000
    if os.environ.get("RNNLAB_SCREENSHOTS"):  # keep it for a reader (the README's picture)
        shutil.copy(tmp_path / "runs_table.png", Path(os.environ["RNNLAB_SCREENSHOTS"]) / "mlflow_runs_table.png")
