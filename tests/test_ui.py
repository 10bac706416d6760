"""The dashboard command (make ui): the same store that training writes to, on this machine only."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from pipeline import config, prepare, ui
from tests.conftest import REPO, compose_config, in_ci
from tests.test_sweeps import SMALL, alive, descendants, multirun, sweep_runs


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


# --- Stopping it as a process manager does ------------------------------------------------------------------------
def launch_ui(root: Path, port: int, log: Path) -> subprocess.Popen:
    """``python -m pipeline.ui`` in a session of its own (the test can always stop what is left of it), its output
    in ``log``: a file, not a pipe that nobody reads."""
    cmd = [sys.executable, "-m", "pipeline.ui", f"paths.root={root}", f"ui.port={port}"]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 180.0) -> None:
    """Until the dashboard answers /health (MLflow's server takes ~10 s, a minute on a loaded machine); fail early if
    ``proc`` exits."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the dashboard exited with {proc.returncode}: {log.read_text()}"
        try:
            opener.open(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the dashboard did not answer in {timeout:.0f} s: {log.read_text()}")


def accepts(port: int) -> bool:
    """Whether something still accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def group_members(pgids: set[int]) -> set[int]:
    """The live (not zombie) processes whose process group is one of ``pgids``, read from /proc."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if state != "Z" and int(group) in pgids:
            found.add(int(stat.parent.name))
    return found


def kill_all(pids: set[int], pgids: set[int]) -> None:
    """SIGKILL these processes and every member of these groups (a test's cleanup: nothing may outlive it)."""
    for group in pgids:
        with suppress(OSError):
            os.killpg(group, signal.SIGKILL)
    for pid in pids:
        with suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_to_the_dashboard_stops_its_whole_server(tmp_path, mlflow_store, signum):
    """What a process manager or `kill <pid>` does (SIGTERM), or a closed terminal (SIGHUP): the signal to the
    pipeline.ui process alone, not its group. Within 15 s it has exited with 128+signal, the port is closed and no
    process it started (nor any of their groups) runs."""
    port, log = free_port(), tmp_path / "ui.log"
    proc = launch_ui(tmp_path, port, log)
    family: set[int] = set()
    groups = {proc.pid}
    try:
        wait_healthy(proc, port, log)
        family = descendants(proc.pid)
        groups |= {group for pid in family if (group := pgid(pid)) is not None}
        assert family, "the web server runs as a child process"
        started = time.monotonic()
        os.kill(proc.pid, signum)
        code = proc.wait(timeout=15)
        while time.monotonic() - started < 15 and (accepts(port) or group_members(groups) or any(map(alive, family))):
            time.sleep(0.2)
        assert code == 128 + signum, log.read_text()
        assert not accepts(port), f"port {port} still open"
        assert not {pid for pid in family if alive(pid)}, "a process the dashboard started still runs"
        assert not group_members(groups), "a process of the dashboard's groups still runs"
    finally:  # also when the dashboard never answered: its server, in a session of its own, is found here
        family |= descendants(proc.pid) if proc.poll() is None else set()
        groups |= {group for pid in family if (group := pgid(pid)) is not None}
        kill_all({proc.pid, *family}, groups)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def test_a_taken_port_is_named_with_the_override_that_avoids_it(make_cfg):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        message = ui.port_in_use(make_cfg(f"ui.port={port}", top="ui"))
    assert message is not None and "\n" not in message
    assert message.startswith(f"port {port} on 127.0.0.1 is already in use by ")
    assert "choose a free one with ui.port=" in message
    assert ui.port_in_use(make_cfg(f"ui.port={free_port()}", top="ui")) is None


def test_a_server_that_exits_by_itself_gives_its_code_and_leaves_nothing_running(tmp_path):
    """Its own code, and what it started in its group (here a sleep) is stopped too."""
    script = (
        "import subprocess, sys; "
        f"p = subprocess.Popen(['sleep', '60']); open({str(tmp_path / 'pid')!r}, 'w').write(str(p.pid)); sys.exit(3)"
    )
    assert ui.serve([sys.executable, "-c", script], grace=2) == 3
    assert not alive(int((tmp_path / "pid").read_text()))


def test_a_server_that_exits_0_by_itself_is_a_failure(capsys):
    """As ``mlflow ui`` does when its web server cannot listen: nobody asked it to stop, so not a success."""
    assert ui.serve([sys.executable, "-c", "pass"]) == 1
    assert "stopped by itself" in capsys.readouterr().err


def test_a_server_that_ignores_the_stop_signal_is_killed_after_the_grace_time(tmp_path):
    """The 'server' ignores SIGTERM and sends one to pipeline.ui (this process, inside serve()): SIGKILL of its
    group after the grace time, exit code 128+15."""
    script = (
        "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid())); "
        "os.kill(os.getppid(), signal.SIGTERM); time.sleep(60)"
    )
    started = time.monotonic()
    assert ui.serve([sys.executable, "-c", script], grace=0.5) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 10
    assert not alive(int((tmp_path / "pid").read_text()))
