"""`python -m pipeline.server` with real parts: a foreign server that owns (or grabs) the port, starting twice, a
crashed server whose pid files now name other processes, and `status` on a stopped server."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from pipeline import teamserver
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.server, pytest.mark.needs_postgres]  # skipped without it, not in CI


@pytest.fixture
def spec(tmp_path):
    """A state folder and two free ports; whatever a test started from them is stopped afterwards."""
    folder = tmp_path / "team"
    folder.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(folder, 0o755)
    srv = teamserver.TeamServer(folder, port=teamserver.free_port(), pg_port=teamserver.free_port())
    yield srv
    srv.stop()
    assert not (srv.pgdata / "postmaster.pid").exists()
    if not srv.pgdata.is_relative_to(folder):
        shutil.rmtree(srv.pgdata, ignore_errors=True)


def cli(action: str, srv: teamserver.TeamServer, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.server", action, "--dir", str(srv.folder)]
    cmd += ["--port", str(srv.port), "--pg-port", str(srv.pg_port)]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@contextmanager
def foreign_server(port: int):
    """Another program on ``port`` that answers /health with 200, as another MLflow server would."""

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer((teamserver.LOOPBACK, port), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextmanager
def listening_socket(port: int):
    with socket.socket() as sock:
        sock.bind((teamserver.LOOPBACK, port))
        sock.listen()
        yield sock


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "MLflow team server at" not in done.stdout, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.mark.parametrize("taken", ["mlflow", "postgres"])
def test_start_refuses_a_port_another_program_holds(spec, taken):
    port, flag = (spec.port, "--port") if taken == "mlflow" else (spec.pg_port, "--pg-port")
    occupy = foreign_server(port) if taken == "mlflow" else listening_socket(port)
    with occupy:
        line = one_line_error(cli("start", spec))
    assert f"port {port} " in line and "already in use" in line and f"pid {os.getpid()}" in line, line
    assert f"choose a free one with {flag} " in line and "or stop that program" in line, line
    assert not (spec.pgdata / "postmaster.pid").exists()  # nothing was started
    assert not (spec.folder / "mlflow.pid").exists()


def test_start_fails_when_another_server_answers_health_for_ours(spec):
    """The port is free at the check, then another server takes it before our MLflow binds: its /health must not
    count as ours, our MLflow and PostgreSQL must be stopped."""
    cmd = [sys.executable, "-m", "pipeline.server", "start", "--dir", str(spec.folder)]
    cmd += ["--port", str(spec.port), "--pg-port", str(spec.pg_port)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = spec.folder / "mlflow.pid"
    deadline = time.time() + 120
    while not pid_file.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    mlflow_pid = int(pid_file.read_text())
    with foreign_server(spec.port):
        stdout, stderr = proc.communicate(timeout=180)
    line = one_line_error(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
    assert f"port {spec.port} " in line and "not by the MLflow server started here" in line, line
    assert f"pid {os.getpid()}" in line and "--port" in line, line
    assert not psutil.pid_exists(mlflow_pid) or psutil.Process(mlflow_pid).status() == psutil.STATUS_ZOMBIE
    assert not (spec.pgdata / "postmaster.pid").exists() and not pid_file.exists()


def kill_group(pid: int) -> None:
    os.killpg(pid, signal.SIGKILL)
    deadline = time.time() + 30
    while teamserver.group_commands(pid):
        assert time.time() < deadline
        time.sleep(0.1)


def plant_pid(path: Path, pid: int) -> None:
    """Make a pid file name ``pid``: as after a crash, when the system gave the dead server's pid to another."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join([str(pid), *lines[1:]]) + "\n")


def test_twice_crashed_stale_and_stopped(spec):
    started = cli("start", spec)
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"MLflow team server at {spec.uri}" in started.stdout

    again = cli("start", spec)
    assert again.returncode == 0, again.stdout + again.stderr
    stop_cmd = f"python -m pipeline.server stop --dir {spec.folder}"
    assert f"already running at {spec.uri} (state in {spec.folder}); stop it with `{stop_cmd}`" in again.stdout
    assert "pg_ctl" not in again.stdout + again.stderr
    status = cli("status", spec)
    assert status.returncode == 0 and f"running at {spec.uri}" in status.stdout, status.stdout + status.stderr

    # A crash (both killed outright), then the pids in the stale files are given to an unrelated process.
    postmaster = int((spec.pgdata / "postmaster.pid").read_text().split()[0])
    kill_group(int((spec.folder / "mlflow.pid").read_text()))
    kill_group(os.getpgid(postmaster))
    decoy = subprocess.Popen(["sleep", "300"], user="postgres" if os.geteuid() == 0 else None, start_new_session=True)
    try:
        plant_pid(spec.folder / "mlflow.pid", decoy.pid)
        plant_pid(spec.pgdata / "postmaster.pid", decoy.pid)
        crashed = cli("status", spec)
        assert crashed.returncode == 1 and "not running" in crashed.stdout, crashed.stdout + crashed.stderr

        restarted = cli("start", spec)
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        assert decoy.poll() is None  # the unrelated process was left alone

        stopped = cli("stop", spec)
        assert stopped.returncode == 0 and decoy.poll() is None, stopped.stdout + stopped.stderr
        status = cli("status", spec)
        assert status.returncode == 1 and "Traceback" not in status.stderr, status.stdout + status.stderr
        start_cmd = f"python -m pipeline.server start --dir {spec.folder}"
        assert status.stdout.strip() == f"not running (state in {spec.folder}); start it with `{start_cmd}`"
    finally:
        decoy.kill()
        decoy.wait()
