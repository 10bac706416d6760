"""The compile cache: one folder per machine and dispatch settings, damaged entries dropped, and later processes
loading what the first compiled (same numbers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import struct_pb2

from pipeline import tasks, xla_cache
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TF_XLA_FLAGS", xla_cache.SET_BY_US, *xla_cache.DISPATCH_ENV):
        monkeypatch.delenv(name, raising=False)


def entry(path: Path, cut: int | None = None) -> Path:
    """A real protocol buffer on disk, whole or cut after ``cut`` bytes."""
    data = struct_pb2.Struct(fields={"hlo": struct_pb2.Value(string_value="x" * 500)}).SerializeToString()
    path.write_bytes(data if cut is None else data[:cut])
    return path


def test_the_key_changes_with_the_cpu_and_the_dispatch_caps(tmp_path, monkeypatch, no_flags):
    cpu = tmp_path / "cpuinfo"
    cpu.write_text("model name\t: Some CPU\nflags\t\t: fpu avx2 fma\n")
    key = xla_cache.machine_key(cpu)
    assert key == xla_cache.machine_key(cpu) and len(key) == 16
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
    capped = xla_cache.machine_key(cpu)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    both = xla_cache.machine_key(cpu)
    cpu.write_text("model name\t: Some CPU\nflags\t\t: fpu avx2 fma avx512f\n")
    assert len({key, capped, both, xla_cache.machine_key(cpu)}) == 4


def test_damaged_entries_are_removed_and_whole_ones_kept(tmp_path):
    whole = entry(tmp_path / "a.pb")
    cut = entry(tmp_path / "b.pb", cut=300)
    assert xla_cache.drop_damaged(tmp_path) == [cut]
    assert whole.exists() and not cut.exists()


def test_enable_points_tensorflow_at_the_machines_folder(tmp_path, no_flags):
    damaged = tmp_path / xla_cache.machine_key() / "old.pb"
    damaged.parent.mkdir(parents=True)
    entry(damaged, cut=100)
    used = xla_cache.enable(tmp_path)
    assert used == tmp_path / xla_cache.machine_key()
    assert os.environ["TF_XLA_FLAGS"] == f"{xla_cache.FLAG}={used}"
    assert not damaged.exists()


def test_a_training_run_keeps_its_compiled_loops_under_the_checkout_by_default(tmp_path, no_flags):
    cfg = compose_config([f"paths.root={tmp_path}"])
    assert cfg.trainer.compile_cache == f"{tmp_path}/.cache/xla"
    tasks.setup_runtime(cfg)
    assert os.environ["TF_XLA_FLAGS"] == f"{xla_cache.FLAG}={tmp_path}/.cache/xla/{xla_cache.machine_key()}"


def test_enable_keeps_the_users_flag_and_stays_off_when_asked(tmp_path, monkeypatch, no_flags):
    assert xla_cache.enable(None) is None and "TF_XLA_FLAGS" not in os.environ
    monkeypatch.setenv("TF_XLA_FLAGS", f"{xla_cache.FLAG}=/elsewhere")
    assert xla_cache.enable(tmp_path) is None
    assert os.environ["TF_XLA_FLAGS"] == f"{xla_cache.FLAG}=/elsewhere"


def test_a_child_process_decides_afresh_what_its_parent_set(tmp_path, monkeypatch, no_flags):
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_clustering_debug")
    parents = xla_cache.enable(tmp_path)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")  # the child runs under a cap: another folder
    child = xla_cache.enable(tmp_path)
    assert child != parents and child.parent == parents.parent
    assert os.environ["TF_XLA_FLAGS"] == f"--tf_xla_clustering_debug {xla_cache.FLAG}={child}"
    assert xla_cache.enable(None) is None  # a child without the cache: the parent's folder goes, the user's flag stays
    assert os.environ["TF_XLA_FLAGS"] == "--tf_xla_clustering_debug"


def test_a_nearly_full_disk_leaves_the_cache_off(tmp_path, monkeypatch, no_flags, caplog):
    monkeypatch.setattr(xla_cache, "MIN_FREE_BYTES", 2**62)  # more than any disk has free
    assert xla_cache.enable(tmp_path) is None
    assert "MiB free" in caplog.text and "TF_XLA_FLAGS" not in os.environ


def test_an_unusable_folder_leaves_the_cache_off(tmp_path, no_flags, caplog):
    (tmp_path / "file").write_text("")
    assert xla_cache.enable(tmp_path / "file" / "cache") is None  # a file where the folder would go
    assert "cannot use" in caplog.text and "TF_XLA_FLAGS" not in os.environ


PROGRAM = """
import json, sys
from pipeline import xla_cache
folder = xla_cache.enable(sys.argv[1])
import tensorflow as tf
from pipeline import kernels
tf.random.set_seed(1)
xz, h, c, rk = tf.random.normal([6, 3, 16]), tf.zeros([3, 4]), tf.zeros([3, 4]), tf.random.normal([4, 16])
with tf.GradientTape() as tape:
    tape.watch([xz, h, c, rk])
    out, h, c = kernels.lstm_sequence(xz, h, c, rk)
    loss = tf.reduce_sum(out * out) + tf.reduce_sum(c)
grads = tape.gradient(loss, [xz, rk])
print(json.dumps({"folder": str(folder), "sums": [float(tf.reduce_sum(g)) for g in grads]}))
"""


def run_program(cache: Path) -> dict:
    drop = ("TF_XLA_FLAGS", xla_cache.SET_BY_US, *xla_cache.DISPATCH_ENV)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(cache)], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_a_second_process_loads_the_compiled_loops_and_gets_the_same_numbers(tmp_path):
    first = run_program(tmp_path)
    folder = Path(first["folder"])
    entries = sorted(folder.glob("*.pb"))
    assert len(entries) == 2  # the LSTM's forward and backward loops
    second = run_program(tmp_path)
    assert second == first and sorted(folder.glob("*.pb")) == entries
    entries[0].write_bytes(entries[0].read_bytes()[:1000])  # a damaged entry: dropped, compiled again, no error
    assert run_program(tmp_path) == first
    assert entries[0].stat().st_size > 1000
