"""A team tracking server on this machine: PostgreSQL (a private cluster) as MLflow's backend store, and the
MLflow server with proxied artifacts, both bound to 127.0.0.1 unless asked otherwise. ``TeamServer`` starts,
checks and stops one; ``pipeline.server`` is its command line, and the dashboard and searches use the port helpers.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import psutil

from pipeline.config import ROOT

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SEARCH_DATABASE = "optuna"  # Optuna's studies (searches tracked on the server), beside MLflow's database
DEFAULT_DIR = ROOT / ".team-server"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback health checks skip proxies


class ServerError(RuntimeError):
    """The team server could not be started or stopped; the message says why and what to do."""


class AlreadyRunning(ServerError):
    """This state folder's server already runs; ``same`` when it runs on the ports that were asked for."""

    def __init__(self, message: str, same: bool) -> None:
        super().__init__(message)
        self.same = same


class NotRunning(ServerError):
    """This state folder's server does not run (an answer to `status`, not a failure to do something)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def pg_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, or in Debian's versioned folder."""
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if not found:
        raise ServerError(f"PostgreSQL's {name} is not installed: `sudo apt-get install postgresql` (Debian/Ubuntu)")
    return str(found)


def port_taken(host: str, port: int) -> bool:
    """Whether a server could not listen on ``host:port`` because something already listens there (on that address
    or on all of them); SO_REUSEADDR, as servers set it, so that closed connections do not count."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def port_listeners(port: int) -> list[int] | None:
    """The pids listening on TCP ``port`` (0 for a process of another user), or None where the system will not say."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    return sorted({c.pid or 0 for c in conns if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port})


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _cmdline(pid: int) -> list[str] | None:
    """The command line of a live process (None when gone or a zombie; [] when this user may not read it)."""
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.cmdline()
    except psutil.AccessDenied:
        return []
    except psutil.Error:
        return None


def group_commands(pgid: int) -> list[list[str]]:
    """The command lines of the live processes in process group ``pgid``."""
    found = []
    for proc in psutil.process_iter():
        if _pgid(proc.pid) == pgid and (args := _cmdline(proc.pid)) is not None:
            found.append(args)
    return found


def describe(pid: int) -> str:
    """Who holds a port, in words: another team server's state folder when it is one, else its pid and command."""
    if not pid:
        return "a program of another user"
    leader = _cmdline(_pgid(pid) or pid) or []
    if "--artifacts-destination" in leader and leader.index("--artifacts-destination") + 1 < len(leader):
        folder = Path(leader[leader.index("--artifacts-destination") + 1]).parent
        return f"the team server of {folder} (pid {pid}; stop it with `{cli('stop', folder)}`)"
    args = " ".join(_cmdline(pid) or [])
    return f"pid {pid} ({args[:80]}{'...' if len(args) > 80 else ''})" if args else f"pid {pid}"


def cli(action: str, folder: Path) -> str:
    """The command that does ``action`` to the server of ``folder``."""
    where = "" if folder == DEFAULT_DIR.resolve() else f" --dir {folder}"
    return f"python -m pipeline.server {action}{where}"


def _kill_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM a process group, SIGKILL it after ``grace`` seconds; return once none of it runs (its ports free)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pgid, os.WNOHANG)  # reap the leader if it is our own child
            if not group_commands(pgid):
                return
            time.sleep(0.1)


@dataclass
class TeamServer:
    """The state of one server: its folder (database cluster, artifacts, logs, pids) and its ports."""

    folder: Path
    port: int = 5001
    pg_port: int = 5433
    host: str = LOOPBACK
    database: str = "mlflow"
    user: str = "mlflow"

    @property
    def uri(self) -> str:
        """The tracking URI clients use (loopback even when the server listens more widely)."""
        return f"http://{LOOPBACK if self.host in ('0.0.0.0', '::') else self.host}:{self.port}"

    @property
    def backend_uri(self) -> str:
        return f"postgresql+psycopg2://{self.user}@{LOOPBACK}:{self.pg_port}/{self.database}"

    @property
    def search_storage(self) -> str:
        """Optuna's storage for searches tracked on this server: a database of its own in the same cluster."""
        return f"postgresql+psycopg2://{self.user}@{LOOPBACK}:{self.pg_port}/{SEARCH_DATABASE}"

    @cached_property
    def pgdata(self) -> Path:
        """The database cluster: in the state folder, unless PostgreSQL's system user cannot reach it (running as
        root in a private folder), then in a folder of its own under /tmp named after the state folder."""
        inside = self.folder / "pgdata"
        if (
            os.geteuid() != 0
            or subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(self.folder)]).returncode == 0
        ):
            return inside
        digest = hashlib.sha256(str(self.folder).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"rnnlab-pgdata-{digest}"

    def _as_db_owner(self, cmd: list[str]) -> list[str]:
        """PostgreSQL refuses to run as root: run its programs as the `postgres` system user then."""
        if os.geteuid() != 0:
            return cmd
        return ["runuser", "-u", "postgres", "--", *cmd]

    def _run(self, cmd: list[str]) -> str:
        done = subprocess.run(self._as_db_owner(cmd), capture_output=True, text=True)
        if done.returncode != 0:
            raise ServerError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def _mlflow_group(self) -> int | None:
        """The process group of this folder's MLflow server while it runs; None when mlflow.pid is missing or names
        a dead group or one that is not MLflow (its pid given to another program since)."""
        try:
            pgid = int((self.folder / "mlflow.pid").read_text())
        except (OSError, ValueError):
            return None
        return pgid if any("mlflow" in " ".join(args) for args in group_commands(pgid)) else None

    def _postmaster(self) -> int | None:
        """The pid of this cluster's PostgreSQL while it runs; None when postmaster.pid is missing or stale."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        args = _cmdline(pid)
        if args == []:  # not ours to read: keep it rather than take a live server's lock away
            return pid
        return pid if args and f" {self.pgdata} " in f" {' '.join(args)} " else None  # its -D, word for word

    def _clear_stale(self) -> None:
        """Remove what a crash left behind: pid files of dead processes, and a PostgreSQL without its MLflow."""
        if self._mlflow_group() is None:
            (self.folder / "mlflow.pid").unlink(missing_ok=True)
        if self._postmaster():
            log.info("stopping the PostgreSQL that an earlier start left running without its MLflow server")
        self._stop_postgres()

    def _stop_postgres(self) -> None:
        if self._postmaster():
            self._run([pg_bin("pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "stop"])
        if not self._postmaster():  # its lock files name a dead process, or one that is not this cluster's
            for stale in [self.pgdata / "postmaster.pid", *self.pgdata.glob(".s.PGSQL.*")]:
                stale.unlink(missing_ok=True)

    def _refuse_if_running(self) -> None:
        if self._mlflow_group() is None:
            return
        if not self._postmaster():
            raise ServerError(
                f"the MLflow server runs without its PostgreSQL: `{cli('stop', self.folder)}`, then start"
            )
        running = TeamServer.load(self.folder) if (self.folder / "server.json").exists() else self
        same = (running.uri, running.pg_port) == (self.uri, self.pg_port)
        message = (
            f"already running at {running.uri} (state in {self.folder}); stop it with `{cli('stop', self.folder)}`"
        )
        if not same:
            message += f"; it does not use the ports asked for (--port {self.port} --pg-port {self.pg_port})"
        raise AlreadyRunning(message, same)

    def _require_free(self, port: int, host: str, flag: str, what: str) -> None:
        """Refuse a port another program listens on, naming it and a free port to use instead."""
        if not port_taken(host, port):
            return
        known = [pid for pid in port_listeners(port) or [] if pid]
        who = describe(known[0]) if known else "another program"
        candidates = (p for p in range(port + 1, min(port + 100, 65536)) if p not in {self.port, self.pg_port})
        spare = next((p for p in candidates if not port_taken(host, p)), None) or free_port()
        raise ServerError(
            f"port {port} ({what}) on {host} is already in use by {who}: "
            f"choose a free one with {flag} {spare}, or stop that program"
        )

    def _healthy(self) -> bool:
        try:
            with _NO_PROXY.open(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except (OSError, http.client.HTTPException):
            return False

    def _serves(self, pgid: int) -> bool | None:
        """Whether the process group ``pgid`` is what listens on the MLflow port; None where the system won't say."""
        pids = port_listeners(self.port)
        if pids is None:
            return None
        return any(pid and _pgid(pid) == pgid for pid in pids)

    def _log_tail(self, start: int) -> str:
        """The line of mlflow.log (written since byte ``start``) that best says why the server stopped."""
        with open(self.folder / "mlflow.log", "rb") as logfile:
            logfile.seek(start)
            lines = [line.strip() for line in logfile.read().decode(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        return ((errors or lines or ["no output"])[-1])[:200]

    def start_postgres(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self.pgdata.mkdir(parents=True, exist_ok=True)
            shutil.chown(self.pgdata, "postgres")
        if not (self.pgdata / "PG_VERSION").exists():
            self._run([pg_bin("initdb"), "-D", str(self.pgdata), "-A", "trust", "-U", self.user, "-E", "UTF8"])
        options = f"-c listen_addresses={LOOPBACK} -p {self.pg_port} -k {self.pgdata}"
        logfile = str(self.pgdata / "postgres.log")
        self._run([pg_bin("pg_ctl"), "-D", str(self.pgdata), "-o", options, "-l", logfile, "-w", "start"])
        psql = [pg_bin("psql"), "-h", LOOPBACK, "-p", str(self.pg_port), "-U", self.user, "-d", "postgres", "-tAc"]
        for database in (self.database, SEARCH_DATABASE):
            if not self._run([*psql, f"SELECT 1 FROM pg_database WHERE datname = '{database}'"]).strip():
                self._run([pg_bin("createdb"), "-h", LOOPBACK, "-p", str(self.pg_port), "-U", self.user, database])

    def start_mlflow(self, timeout: float = 90.0) -> None:
        """Start the MLflow server and wait until it, not another program on its port, answers /health."""
        if self.host != LOOPBACK:
            log.warning("the MLflow server listens on %s: anyone who can reach it can read and write runs", self.host)
        self._require_free(self.port, self.host, "--port", "MLflow")
        artifacts = self.folder / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri]
        cmd += ["--artifacts-destination", str(artifacts), "--serve-artifacts", "--host", self.host]
        cmd += ["--port", str(self.port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.folder / "mlflow.log", "ab") as logfile:
            log_start = logfile.tell()
            proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        (self.folder / "mlflow.pid").write_text(str(proc.pid))
        self._wait_healthy(proc, timeout, log_start)

    def _wait_healthy(self, proc: subprocess.Popen, timeout: float, log_start: int) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                why = self._log_tail(log_start)
                raise ServerError(
                    f"the MLflow server exited with {proc.returncode} ({why}); see {self.folder}/mlflow.log"
                )
            if self._healthy():
                serves = self._serves(proc.pid)
                if serves is False:
                    other = next((pid for pid in port_listeners(self.port) or [] if _pgid(pid) != proc.pid), 0)
                    raise ServerError(
                        f"port {self.port} on {self.host} is answered by {describe(other)}, not by the MLflow server "
                        f"started here: choose a free one with --port, or stop that program"
                    )
                if proc.poll() is None:
                    return
            time.sleep(0.5)
        raise ServerError(f"mlflow server not healthy after {timeout:.0f} s; see {self.folder / 'mlflow.log'}")

    def start(self) -> str:
        """Start both (PostgreSQL first) on ports checked free; return the tracking URI."""
        if self.port == self.pg_port:
            raise ServerError(f"--port and --pg-port are both {self.port}: give PostgreSQL and MLflow different ports")
        self._refuse_if_running()
        self._clear_stale()
        self._require_free(self.port, self.host, "--port", "MLflow")
        self._require_free(self.pg_port, LOOPBACK, "--pg-port", "PostgreSQL")
        try:
            self.start_postgres()
            self.start_mlflow()
        except BaseException:
            try:
                self.stop()
            except ServerError as err:
                log.warning("could not stop what was started: %s", err)
            raise
        (self.folder / "server.json").write_text(json.dumps({**asdict(self), "folder": str(self.folder)}))
        return self.uri

    def stop(self) -> None:
        """Stop the MLflow server (its whole process group), then PostgreSQL. Safe to call twice, and after a crash:
        a pid file that names a dead process, or one that is not ours, is removed and nothing is signalled."""
        pgid = self._mlflow_group()
        if pgid is not None:
            _kill_group(pgid)
        (self.folder / "mlflow.pid").unlink(missing_ok=True)
        self._stop_postgres()

    def status(self) -> str:
        """One line on this folder's server when it runs and answers; NotRunning when it does not run."""
        pgid = self._mlflow_group()
        if pgid is None:
            pg = f"; its PostgreSQL still runs (`{cli('stop', self.folder)}` stops it)" if self._postmaster() else ""
            raise NotRunning(f"not running (state in {self.folder}){pg}; start it with `{cli('start', self.folder)}`")
        if not self._postmaster():
            raise ServerError(
                f"the MLflow server runs without its PostgreSQL: `{cli('stop', self.folder)}`, then start"
            )
        if not self._healthy():
            raise ServerError(
                f"the MLflow server runs but {self.uri}/health does not answer; see {self.folder}/mlflow.log"
            )
        if self._serves(pgid) is False:
            raise ServerError(f"{self.uri} is answered by another program, not by the MLflow server of {self.folder}")
        return f"running at {self.uri} (PostgreSQL on {LOOPBACK}:{self.pg_port}, state in {self.folder})"

    @classmethod
    def load(cls, folder: Path) -> TeamServer:
        state = folder / "server.json"
        if not state.exists():
            raise NotRunning(
                f"not running: no server was started from {folder}; start one with `{cli('start', folder)}`"
            )
        fields = json.loads(state.read_text())
        return cls(**{**fields, "folder": Path(fields["folder"])})
