"""The MLflow dashboard on the store that training writes to (``make ui``).

python -m pipeline.ui                      # the local store (tracking=local), http://127.0.0.1:5000
python -m pipeline.ui ui.port=5050         # another port

The server runs as a child in a process group of its own: SIGTERM, SIGINT or SIGHUP to this process stops all of
it (``mlflow ui`` starts uvicorn workers and job runners as children of its own), within seconds. The exit code
says how it ended: 128+signal when a signal stopped it, else the server's own code (1 for a port already in use,
said in one line before anything starts, and for a server that stopped by itself with 0).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from types import FrameType

import hydra
from omegaconf import DictConfig

from pipeline import config, teamserver, tracking
from pipeline.redaction import redact

config.register()

# MLflow 3.17's dashboard opens every experiment as a GenAI one (a traces overview) until the "Model training"
# toggle is set once in the browser; this query parameter opens the training runs directly.
TRAINING_VIEW = "workflowType=machine_learning"

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # a process manager or kill; Ctrl-C; a closed terminal
PASSED_AS = {signal.SIGHUP: signal.SIGTERM}  # a closed terminal stops it: uvicorn reads SIGHUP as "restart workers"
GRACE = 5.0  # seconds the server's group has to exit after a stop signal before it is killed (SIGKILL)
POLL = 0.2  # seconds between checks whether the server still runs


def command(cfg: DictConfig) -> list[str]:
    """The ``mlflow ui`` command for the configured store: the same ``tracking`` config as training reads."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        cfg.tracking.uri,
        "--host",
        cfg.ui.host,
        "--port",
        str(cfg.ui.port),
    ]


def runs_url(cfg: DictConfig, experiment_id: str) -> str:
    """The dashboard's runs table of one experiment, in the model-training view."""
    return f"http://{cfg.ui.host}:{cfg.ui.port}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"


def experiment_links(cfg: DictConfig) -> list[str]:
    """``name: url`` for each rnnlab experiment in the store (none when the store is new or unreadable)."""
    try:
        found = tracking.experiments(cfg.tracking.uri, "rnnlab-%")
    except tracking.TrackingError:
        return []
    return [f"  {name}: {runs_url(cfg, experiment_id)}" for name, experiment_id in found]


def port_in_use(cfg: DictConfig) -> str | None:
    """One line naming who holds the dashboard's port and a free one to ask for, or None when it is free. Checked
    before starting because ``mlflow ui`` on a taken port logs one error among its start-up lines and exits 0."""
    host, port = cfg.ui.host, int(cfg.ui.port)
    if not teamserver.port_taken(host, port):
        return None
    holders = [pid for pid in teamserver.port_listeners(port) or [] if pid]
    who = teamserver.describe(holders[0]) if holders else "another program"
    nearby = (p for p in range(port + 1, min(port + 100, 65536)) if not teamserver.port_taken(host, p))
    spare = next(nearby, None) or teamserver.free_port()
    return f"port {port} on {host} is already in use by {who}: choose a free one with ui.port={spare}, or stop it"


def signal_group(pgid: int, signum: int) -> None:
    """Send ``signum`` to every process of group ``pgid``; a group that has already exited is no error."""
    with suppress(ProcessLookupError):
        os.killpg(pgid, signum)


class Forwarder:
    """The stop signals this process receives, each passed on to the server's whole group as it arrives: the server
    runs in a session of its own, so no terminal or process manager reaches it but through this process."""

    def __init__(self) -> None:
        self.pgid: int | None = None  # the server's group, once started
        self.received: list[int] = []
        self.since: float | None = None  # time.monotonic() of the first stop signal

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self.since is None:
            self.since = time.monotonic()
        self.forward(signum)

    def attach(self, pgid: int) -> None:
        """Pass signals to group ``pgid`` from now on, and one that came while it was starting at once."""
        self.pgid = pgid
        if self.received:
            self.forward(self.received[0])

    def forward(self, signum: int) -> None:
        if self.pgid is not None:
            signal_group(self.pgid, PASSED_AS.get(signum, signum))


def wait(proc: subprocess.Popen, forwarder: Forwarder, grace: float) -> int:
    """The server's exit status. ``grace`` seconds after the first stop signal its whole group is killed: a server
    that ignores the signal must not keep this process, or the port, busy."""
    while True:
        with suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=POLL)
        if forwarder.since is not None and time.monotonic() > forwarder.since + grace:
            signal_group(proc.pid, signal.SIGKILL)


def clear_group(pgid: int, deadline: float) -> None:
    """Stop what is left of the server's group once its leader has exited (its job runners outlive it by seconds,
    or for good when it was killed): SIGTERM now, SIGKILL from ``deadline`` on, until none of it runs."""
    if teamserver.group_commands(pgid):
        signal_group(pgid, signal.SIGTERM)
    while teamserver.group_commands(pgid) and time.monotonic() < deadline + GRACE:  # (SIGKILL takes a moment at most)
        if time.monotonic() >= deadline:
            signal_group(pgid, signal.SIGKILL)
        time.sleep(POLL)


def exit_code(returncode: int, received: list[int]) -> int:
    """128+signal when a stop signal ended the server (the shell's convention), else the server's own code, a
    signal that killed it also as 128+signal. An exit with 0 that nobody asked for is a failure (1): ``mlflow ui``
    exits 0 when its web server could not start."""
    if received:
        return 128 + received[0]
    if returncode < 0:
        return 128 - returncode
    return returncode or 1


def serve(cmd: list[str], grace: float = GRACE) -> int:
    """Run the server ``cmd`` as a child in a session of its own until it exits, passing every stop signal on to its
    whole group; its exit code (see ``exit_code``). On return nothing of its group runs."""
    forwarder = Forwarder()
    previous = {signum: signal.signal(signum, forwarder) for signum in STOP_SIGNALS}
    try:
        proc = subprocess.Popen(cmd, start_new_session=True)
        forwarder.attach(proc.pid)
        try:
            returncode = wait(proc, forwarder, grace)
        finally:  # a stopped server's group has until the SIGKILL it was due; one that exited by itself, ``grace``
            clear_group(proc.pid, (time.monotonic() if forwarder.since is None else forwarder.since) + grace)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if returncode == 0 and not forwarder.received:
        print("error: the MLflow server stopped by itself: its messages above say why", file=sys.stderr)
    return exit_code(returncode, forwarder.received)


@hydra.main(config_path="../conf", config_name="ui", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.tracking.uri.startswith(("http://", "https://")):
        print(f"a tracking server serves its own dashboard: open {redact(cfg.tracking.uri)}")
        return
    if taken := port_in_use(cfg):
        sys.exit(f"error: {taken}")
    print(f"MLflow dashboard for {redact(cfg.tracking.uri)} on http://{cfg.ui.host}:{cfg.ui.port}")
    links = experiment_links(cfg)
    if links:
        print("Training runs of each experiment (or click 'Model training' at the top left once):", *links, sep="\n")
    sys.stdout.flush()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    sys.exit(serve(command(cfg)))


if __name__ == "__main__":
    main()
