"""XLA's compiled training loops kept on disk, so that later runs on the same machine skip compiling them.

The fused language-model loops (``pipeline/kernels.py``) are compiled by XLA in every new process: several seconds
of a short run, paid again by every job of a sweep. TensorFlow can persist the compiled executables
(``TF_XLA_FLAGS=--tf_xla_persistent_cache_directory``), but its cache key is the computation alone: code compiled for
one CPU (AVX-512, say) would be loaded on another, or under ``XLA_FLAGS=--xla_cpu_max_isa=AVX2``, and a damaged entry
or an unwritable folder stops the run. So the folder gets one subfolder per TensorFlow version, CPU and dispatch
settings; entries that do not parse are removed before TensorFlow reads them; and the cache stays off when the disk
is nearly full.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from collections.abc import Mapping
from pathlib import Path

from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

FLAG = "--tf_xla_persistent_cache_directory"
SET_BY_US = "RNNLAB_XLA_CACHE"  # the folder this module put into TF_XLA_FLAGS (a child process decides afresh)
MIN_FREE_BYTES = 512 * 2**20  # below this much free space the cache stays off (an entry is about 1 MB)
DISPATCH_ENV = ("XLA_FLAGS", "ONEDNN_MAX_CPU_ISA")  # settings that change the code XLA and oneDNN generate


def machine_key(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """A short hash of what compiled code depends on: TensorFlow's version, the CPU (model and flags) and the
    dispatch caps in the environment."""
    import tensorflow as tf

    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        lines = []
    cpu = sorted({line for line in lines if line.startswith(("model name", "flags"))})
    parts = [tf.__version__, platform.machine(), *cpu, *(f"{k}={os.environ.get(k, '')}" for k in DISPATCH_ENV)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def drop_damaged(folder: Path) -> list[Path]:
    """Remove entries that are not whole protocol buffers (a truncated copy, a disk error): TensorFlow would stop
    the run reading one. Returns what was removed."""
    removed = []
    for entry in sorted(folder.glob("*.pb")):
        try:
            empty_pb2.Empty().ParseFromString(entry.read_bytes())  # parses any message's wire format; fails if cut
        except (DecodeError, OSError):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        log.warning("compile cache: removed %d damaged entries in %s (they are compiled again)", len(removed), folder)
    return removed


def enable(folder: str | Path | None) -> Path | None:
    """Point TensorFlow's persistent XLA cache at ``folder``/<machine key>, before the first XLA compilation of the
    process (TensorFlow reads the flag once). Returns the folder in use, or None: off (``folder`` None), set already
    in ``TF_XLA_FLAGS`` by the user (their choice is kept), or the disk too full or the folder unwritable. A flag that
    a parent rnnlab process set is replaced: the child may run under other dispatch caps, or without the cache."""
    flags = inherited_flags()
    if folder is None or FLAG in flags:
        return None
    path = Path(folder) / machine_key()
    try:
        path.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path).free
    except OSError as err:
        log.warning("compile cache off: cannot use %s (%s); XLA compiles in this run", path, err)
        return None
    if free < MIN_FREE_BYTES:
        log.warning("compile cache off: %d MiB free at %s; XLA compiles in this run", free // 2**20, path)
        return None
    drop_damaged(path)
    os.environ["TF_XLA_FLAGS"] = f"{flags} {FLAG}={path}".strip()
    os.environ[SET_BY_US] = str(path)
    return path


def inherited_flags() -> str:
    """``TF_XLA_FLAGS`` without the cache folder an rnnlab parent process put there (the user's flags stay)."""
    os.environ.update(without_ours(os.environ))
    os.environ.pop(SET_BY_US, None)
    return os.environ.get("TF_XLA_FLAGS", "")


def without_ours(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` without the cache folder this module set: for a program that must compile on its own (a
    plain baseline in ``make bench``, a run with the cache off)."""
    env = dict(env)
    ours = env.pop(SET_BY_US, None)
    if ours and "TF_XLA_FLAGS" in env:
        env["TF_XLA_FLAGS"] = " ".join(word for word in env["TF_XLA_FLAGS"].split() if word != f"{FLAG}={ours}")
    return env
