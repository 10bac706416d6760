"""rnnlab: classic recurrent-network experiments as a tracked, cached, sweepable pipeline.

Every stage imports this package first, so the process-wide defaults below are in place before anything imports
TensorFlow. They use ``setdefault``: a value the user exported wins.
"""

import contextlib
import importlib.abc
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

# No telemetry from anything we run.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# MLflow's "Downloading artifacts" bars on a terminal only: in DVC, CI or a file they are lines of carriage returns.
if not (sys.stderr is not None and sys.stderr.isatty()):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# TensorFlow's C++ log level: 3 hides its INFO, WARNING and ERROR lines (FATAL still shows, and every failed op
# still raises a Python exception with the message). Level 3 because the lines a normal run prints are all harmless
# ERRORs ("node_def_util ... use_unbounded_threadpool", "oneDNN supports DT_BOOL only on platforms with AVX-512").
# TF_CPP_MIN_LOG_LEVEL=0 shows everything again, 2 brings the ERROR lines back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# A C++ log line as TensorFlow prints it: absl's "I0000 00:00:1796188412.848610   21416 port.cc:153] ..." or the
# older "2025-01-30 22:44:42.456316: I tensorflow/core/util/port.cc:153] ...". Group 1 or 2 is the severity.
CPP_LOG_LINE = rb"^(?:([IWE])\d{4} \d\d:\d\d:\S+\s+\d+ |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ([IWE]) )\S+:\d+\] "
ABSL_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"

# Run as `python -I -S -c FILTER LEVEL PATTERN BANNER` with the import's stderr on its stdin: it copies every line to
# its own stderr (the real one) except C++ log lines below LEVEL and absl's banner. A separate process, not a
# thread, so that whatever TensorFlow printed before a crash during the import still reaches the user.
FILTER = r"""
import os, re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; keep copying until its stderr closes
level, line_re, banner = int(sys.argv[1]), re.compile(sys.argv[2].encode()), sys.argv[3].encode()
hidden = b"IWE"[:level]
def keep(line):
    found = line_re.match(line)
    return not (line.rstrip() == banner or found and (found.group(1) or found.group(2)) in hidden)
rest = b""
while chunk := os.read(0, 65536):
    *lines, rest = (rest + chunk).split(b"\n")
    os.write(2, b"".join(line + b"\n" for line in lines if keep(line)))
if rest and keep(rest):
    os.write(2, rest)
"""


def tf_log_level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as TensorFlow reads it (not a number: 0)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def filtered_stderr(level: int) -> Iterator[None]:
    """Pass this process's stderr (file descriptor 2, where C++ writes) through ``FILTER`` for a while.

    Why: TensorFlow prints "oneDNN custom operations are on" and absl's "All log messages before
    absl::InitializeLog()" banner while its libraries load (once per library: twice), before it reads
    ``TF_CPP_MIN_LOG_LEVEL``, so the setting cannot hide them; only ``TF_ENABLE_ONEDNN_OPTS=0`` does, at 15% of
    the speed. Anything that is not such a line (a Python warning, an error) goes through unchanged.
    """
    saved = None
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(2)
        command = [sys.executable, "-I", "-S", "-c", FILTER, str(level), CPP_LOG_LINE.decode(), ABSL_BANNER.decode()]
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    except (OSError, ValueError):  # no interpreter to run, no descriptors left, no stderr at all: print as is
        if saved is not None:
            os.close(saved)
        yield
        return
    os.dup2(proc.stdin.fileno(), 2)
    try:
        yield
    finally:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):  # a child process started meanwhile may hold the pipe
            proc.wait(timeout=10)


class OneImportInside(importlib.abc.MetaPathFinder):
    """Finds one module once, as the normal finders do, and runs its import (submodules included) inside ``context``."""

    def __init__(self, name: str, context: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.name, self.context = name, context

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name != self.name:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # one import only; also keeps find_spec below from finding us again
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            load, context = spec.loader.exec_module, self.context

            def exec_module(module: ModuleType) -> None:
                with context():
                    load(module)

            spec.loader.exec_module = exec_module
        return spec


@contextlib.contextmanager
def quiet_import() -> Iterator[None]:
    """TensorFlow's import with its C++ banner lines filtered out (``filtered_stderr``), at the level read now."""
    level = tf_log_level()
    with filtered_stderr(level) if level > 0 else contextlib.nullcontext():
        yield


# Packages Keras imports when they are installed, for features rnnlab never uses: scikit-learn for its
# ``keras.wrappers`` estimators and Matplotlib for ``keras.visualization``'s image galleries. MLflow installs both.
KERAS_EXTRAS = ("sklearn", "matplotlib")


@contextlib.contextmanager
def without_keras_extras() -> Iterator[None]:
    """Keras' import with ``KERAS_EXTRAS`` failing to import, as if they were not installed.

    Why: they are 1.2 s of every process's start (scikit-learn brings SciPy, which nothing else needs before a
    comparison). Only while Keras loads: anything that imports them afterwards (the report's plots) gets them, and
    in an rnnlab process ``keras.wrappers`` and ``keras.visualization`` say they are missing.
    """
    blocked = [name for name in KERAS_EXTRAS if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # None in sys.modules: importing it raises ImportError
    try:
        yield
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


if "tensorflow" not in sys.modules and tf_log_level() > 0:
    sys.meta_path.insert(0, OneImportInside("tensorflow", quiet_import))
if "keras" not in sys.modules:
    sys.meta_path.insert(0, OneImportInside("keras", without_keras_extras))
