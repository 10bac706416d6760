"""Quiet, informative stages: no TensorFlow C++ start-up or E0000 lines unless the user asks for them, a progress
bar per epoch on a terminal and only the one line per epoch elsewhere. Real processes, as a user runs them."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

# TensorFlow's C++ log lines (absl's format) and its two start-up lines.
CPP_NOISE = re.compile(r"oneDNN custom operations|absl::InitializeLog|^[IWE]0000 ", re.MULTILINE)
EPOCH_LINE = re.compile(r"\[__main__\]\[INFO\] - epoch 1/1: \{'train/loss': ")
BAR = re.compile(r"epoch 1/1: +0%\|.*\| 0/3 \[")  # tqdm's first frame: desc, percentage, bar, count


def user_env(**settings: str) -> dict[str, str]:
    """The environment of a user who set no TensorFlow logging variable (pytest's process has ours), plus these."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "COLUMNS", "LINES")}
    return {**env, "PYTHONPATH": str(REPO), **settings}


def train_argv(root: Path, *overrides: str) -> list[str]:
    """One epoch of three steps on the toy data, asking for the progress bar (trainer.verbose=1)."""
    budget = ["trainer.epochs=1", "trainer.max_steps_per_epoch=3", "trainer.max_eval_batches=2", "trainer.verbose=1"]
    return [sys.executable, "-m", "pipeline.train", f"paths.root={root}", *budget, *overrides]


def run_piped(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run as DVC or CI would: stdout and stderr to a pipe. Returns both, interleaved."""
    done = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    output = done.stdout.decode(errors="replace")
    assert done.returncode == 0, output
    return output


def run_in_terminal(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    """Run with stdin, stdout and stderr on a pseudo-terminal 120 columns wide, as in an interactive shell."""
    master, slave = pty.openpty()
    termios.tcsetwinsize(slave, (30, 120))  # a terminal of no width gets no bar from tqdm
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every end of the terminal in the child is closed
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        else:
            proc.kill()
    finally:
        os.close(master)
    output = b"".join(chunks).decode(errors="replace")
    assert proc.wait(timeout=30) == 0, output
    return output


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> tuple[Path, str]:
    """The toy data prepared by the real stage; returns the root and what the stage printed."""
    root = tmp_path_factory.mktemp("quiet")
    output = run_piped([sys.executable, "-m", "pipeline.prepare", f"paths.root={root}"], root, user_env())
    return root, output


@pytest.mark.integration  # a real TensorFlow process
def test_stages_print_no_tensorflow_cpp_lines_by_default(toy_root):
    """prepare and train (with MLflow, whose signature inference printed E0000 node_def_util ...
    use_unbounded_threadpool) print none of TensorFlow's C++ lines; the epoch line is there, and with no
    terminal there is no progress bar even though trainer.verbose=1 asks for one."""
    root, prepared = toy_root
    output = run_piped(train_argv(root), root, user_env())
    for stage in (prepared, output):
        assert CPP_NOISE.search(stage) is None, stage
    assert EPOCH_LINE.search(output), output
    assert "\r" not in output and "batch/s" not in output and BAR.search(output) is None, output


@pytest.mark.integration  # a real TensorFlow process
def test_the_user_can_bring_tensorflows_cpp_lines_back():
    """TF_CPP_MIN_LOG_LEVEL=0 set by the user wins: TensorFlow's start-up lines are printed again."""
    argv = [sys.executable, "-c", "import pipeline, tensorflow"]
    done = subprocess.run(argv, cwd=REPO, env=user_env(TF_CPP_MIN_LOG_LEVEL="0"), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(rb"^I0000 .*\] ", done.stderr, re.MULTILINE), done.stderr


@pytest.mark.parametrize(
    ("level", "kept"),
    [
        ("3", [b"a Python warning", b"F0000 00:00:1.5   7 x.cc:1] fatal"]),
        (
            "1",
            [
                b"W0000 00:00:1.5   7 x.cc:1] warning",
                b"a Python warning",
                b"E0000 00:00:1.5   7 x.cc:2] error",
                b"F0000 00:00:1.5   7 x.cc:1] fatal",
            ],
        ),
    ],
)
def test_the_import_filter_drops_only_cpp_lines_below_the_level(level, kept):
    """What the filter around TensorFlow's import passes on, byte for byte: every line that is not a C++ log line
    below TF_CPP_MIN_LOG_LEVEL (absl's banner counts as INFO), in order."""
    lines = [
        b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        b"I0000 00:00:1796188412.848610   21416 port.cc:153] oneDNN custom operations are on.",
        b"2026-01-30 22:44:42.456316: I tensorflow/core/util/port.cc:153] oneDNN custom operations are on.",
        b"W0000 00:00:1.5   7 x.cc:1] warning",
        b"a Python warning",
        b"E0000 00:00:1.5   7 x.cc:2] error",
        b"F0000 00:00:1.5   7 x.cc:1] fatal",
    ]
    payload = b"".join(line + b"\n" for line in lines)
    code = f"import os, pipeline\nwith pipeline.filtered_stderr({level}):\n    os.write(2, {payload!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=user_env(), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == kept


@pytest.mark.integration  # a real TensorFlow process
def test_a_terminal_gets_a_progress_bar(toy_root):
    """On a terminal, trainer.verbose=1 draws tqdm's bar for the epoch (cleared when it ends), then the epoch line;
    still no C++ lines."""
    root, _ = toy_root
    output = run_in_terminal(train_argv(root, "tracking.enabled=false"), root, user_env())
    assert BAR.search(output), output
    assert EPOCH_LINE.search(output), output
    assert CPP_NOISE.search(output) is None, output


@pytest.mark.integration  # a real TensorFlow process
def test_mlflow_downloads_draw_no_bars_into_a_pipe(tmp_path):
    """MLflow's "Downloading artifacts" bars (pipeline.generate fetches a model and its vocabulary) are carriage-
    return noise in DVC or CI logs: without a terminal there are none, and the file still arrives."""
    code = (
        "import pipeline, mlflow\n"
        f"mlflow.set_tracking_uri('sqlite:///{tmp_path}/mlflow.db')\n"
        f"mlflow.set_experiment(experiment_id=mlflow.create_experiment('quiet', '{tmp_path}/artifacts'))\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_text('hello', 'notes/a.txt')\n"
        f"print(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path='{tmp_path}/got'))\n"
    )
    output = run_piped([sys.executable, "-c", code], tmp_path, user_env())
    assert (tmp_path / "got" / "notes" / "a.txt").read_text() == "hello"
    assert "Downloading artifacts" not in output and "\r" not in output, output
