"""A team tracking server on this machine: PostgreSQL (a private cluster) as MLflow's backend store, and the
MLflow server with proxied artifacts, both bound to 127.0.0.1 unless asked otherwise.

    python -m pipeline.server start            # or: make server
    python -m pipeline.server status
    python -m pipeline.server stop             # or: make server-stop

Then point training at it: RNNLAB_TRACKING_URI=http://127.0.0.1:5001 python -m pipeline.train tracking=server
"""

from __future__ import annotations

import argparse
import hashlib
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
from pathlib import Path

from pipeline.config import ROOT

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class ServerError(RuntimeError):
    """The team server could not be started or stopped; the message says why and what to do."""


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

    def start_postgres(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self.pgdata.mkdir(parents=True, exist_ok=True)
            shutil.chown(self.pgdata, "postgres")
        if not (self.pgdata / "PG_VERSION").exists():
            self._run([pg_bin("initdb"), "-D", str(self.pgdata), "-A", "trust", "-U", self.user, "-E", "UTF8"])
        options = f"-c listen_addresses={LOOPBACK} -p {self.pg_port} -k {self.pgdata}"
        self._run(
            [
                pg_bin("pg_ctl"),
                "-D",
                str(self.pgdata),
                "-o",
                options,
                "-l",
                str(self.pgdata / "postgres.log"),
                "-w",
                "start",
            ]
        )
        exists = self._run(
            [
                pg_bin("psql"),
                "-h",
                LOOPBACK,
                "-p",
                str(self.pg_port),
                "-U",
                self.user,
                "-d",
                "postgres",
                "-tAc",
                f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'",
            ]
        )
        if not exists.strip():
            self._run([pg_bin("createdb"), "-h", LOOPBACK, "-p", str(self.pg_port), "-U", self.user, self.database])

    def start_mlflow(self, timeout: float = 90.0) -> None:
        if self.host != LOOPBACK:
            log.warning("the MLflow server listens on %s: anyone who can reach it can read and write runs", self.host)
        artifacts = self.folder / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            str(artifacts),
            "--serve-artifacts",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.folder / "mlflow.log", "ab") as logfile:
            proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        (self.folder / "mlflow.pid").write_text(str(proc.pid))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise ServerError(f"mlflow server exited with {proc.returncode}; see {self.folder / 'mlflow.log'}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise ServerError(f"mlflow server not healthy after {timeout:.0f} s; see {self.folder / 'mlflow.log'}")

    def start(self) -> str:
        """Start both (PostgreSQL first); return the tracking URI."""
        self.start_postgres()
        try:
            self.start_mlflow()
        except ServerError:
            self.stop()
            raise
        (self.folder / "server.json").write_text(json.dumps({**asdict(self), "folder": str(self.folder)}))
        return self.uri

    def stop(self) -> None:
        """Stop the MLflow server (its whole process group), then PostgreSQL. Safe to call twice."""
        pid_file = self.folder / "mlflow.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text())
            try:
                os.killpg(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            pid_file.unlink(missing_ok=True)
        if (self.pgdata / "postmaster.pid").exists():
            self._run([pg_bin("pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "stop"])

    @classmethod
    def load(cls, folder: Path) -> TeamServer:
        state = folder / "server.json"
        if not state.exists():
            raise ServerError(f"no server was started from {folder} (no server.json)")
        fields = json.loads(state.read_text())
        return cls(**{**fields, "folder": Path(fields["folder"])})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", type=Path, default=ROOT / ".team-server", help="state folder (default .team-server)")
    parser.add_argument("--port", type=int, default=5001, help="MLflow server port (default 5001)")
    parser.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL port (default 5433)")
    parser.add_argument("--host", default=LOOPBACK, help="address to listen on (default 127.0.0.1: this machine only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.action == "start":
            server = TeamServer(args.dir.resolve(), args.port, args.pg_port, args.host)
            uri = server.start()
            print(f"MLflow team server at {uri} (PostgreSQL on {LOOPBACK}:{args.pg_port}, state in {args.dir})")
            print(f"use it: export RNNLAB_TRACKING_URI={uri}; python -m pipeline.train tracking=server")
        elif args.action == "stop":
            TeamServer.load(args.dir.resolve()).stop()
            print("stopped")
        else:
            server = TeamServer.load(args.dir.resolve())
            with urllib.request.urlopen(f"{server.uri}/health", timeout=5) as response:
                print(f"{server.uri}: {response.read().decode()}")
    except (ServerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
