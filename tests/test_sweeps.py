"""The sweep presets in conf/sweep/ compose to the sweeps they promise; a Hydra multirun is one MLflow parent run
with a child per job, sequential and with the parallel launcher (real processes: the integration tier)."""

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra.types import RunMode
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline import config, prepare, sweep, tracking
from tests.conftest import CONF, REPO, compose_config, in_ci

SMALL = ("data.n_train=64", "data.n_val=32", "data.n_test=32", "model.units=8", "tracking.log_model=false")


# --- The sweep presets, composed as `python -m pipeline.train sweep=<name>` composes them -----------------------------
CELLS = {"model": "rnn,lstm,gru,bilstm", "seed": "1,2,3"}  # every cell sweep repeats over seeds by default
VARIANTS = {"model": "lstm,peephole,cifg,nfg,noaf,gru,mgu", "seed": "1,2,3,4,5"}
MEMORY = {"model": "rnn,lstm,gru", "seed": "1,2,3,4,5"}  # the memory tasks' comparisons
SWEEPS = {  # name -> (dataset, epochs, sweeper, its params)
    "cells_toy": ("toy", 30, "BasicSweeper", CELLS),
    "cells_imdb": ("imdb", 3, "BasicSweeper", CELLS),
    "cells_mnist": ("mnist", 5, "BasicSweeper", CELLS),
    "cells_toy_matched": ("toy", 30, "BasicSweeper", CELLS),
    "cells_imdb_matched": ("imdb", 3, "BasicSweeper", CELLS),
    "cells_mnist_matched": ("mnist", 5, "BasicSweeper", CELLS),
    "cells_ptb_matched": ("ptb", 3, "BasicSweeper", {**CELLS, "model": "rnn,lstm,gru"}),
    "cells_adding": ("adding", 10, "BasicSweeper", MEMORY),
    "cells_copy": ("copy_memory", 10, "BasicSweeper", MEMORY),
    "lstm_variants_mnist": ("mnist", 5, "BasicSweeper", VARIANTS),
    "lstm_variants_imdb": ("imdb", 3, "BasicSweeper", VARIANTS),
    "precision_ptb": ("ptb", 3, "BasicSweeper", {"trainer.precision": "bfloat16_grad,float32", "seed": "1,2,3,4,5"}),
    "ptb_lr": ("ptb", 3, "BasicSweeper", {"optimizer.learning_rate": "0.5,1.0,2.0", "model.dropout": "0.0,0.2"}),
    "optuna_imdb": (
        "imdb",
        3,
        "OptunaSweeper",
        {
            "optimizer.learning_rate": "tag(log, interval(0.0003, 0.01))",
            "model.units": "choice(32, 64, 128)",
            "model.dropout": "interval(0.0, 0.5)",
        },
    ),
    "tune_cells_mnist": (
        "mnist",
        3,
        "OptunaSweeper",
        {
            "model": "rnn,lstm,gru,bilstm",
            "optimizer.learning_rate": "tag(log, interval(0.0003, 0.01))",
            "model.dropout": "interval(0.0, 0.5)",
        },
    ),
    "tune_cells_toy": (
        "toy",
        10,
        "OptunaSweeper",
        {"model": "rnn,lstm,gru", "optimizer.learning_rate": "tag(log, interval(0.001, 0.03))"},
    ),
}
SEARCHES = {"optuna_imdb": (12, "tpe"), "tune_cells_mnist": (8, "random"), "tune_cells_toy": (6, "random")}


def test_every_sweep_preset_has_a_compose_test():
    assert sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")) == sorted(SWEEPS)


def grid_jobs(params: dict[str, str]) -> list[str]:
    """One override per value of each swept key (what the basic sweeper's jobs set); seeds left out: any seed in
    range composes, and composing each costs the fast tier a second."""
    return [f"{key}={value}" for key, values in params.items() if key != "seed" for value in values.split(",")]


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_a_sweep_preset_composes_to_a_multirun_of_its_jobs(name):
    dataset, epochs, sweeper, params = SWEEPS[name]
    cfg = compose_config([f"sweep={name}"], hydra=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN  # a sweep without -m
    assert cfg.hydra.sweeper._target_.endswith(sweeper)
    assert OmegaConf.to_container(cfg.hydra.sweeper.params) == params
    assert (cfg.data.name, cfg.trainer.epochs, cfg.tracking.sweep_name) == (dataset, epochs, name)
    assert cfg.hydra.callbacks.mlflow_sweep._target_ == "pipeline.tracking.SweepCallback"  # one parent run
    if sweeper == "OptunaSweeper":  # train.main returns val/accuracy for a classifier: to be maximised
        s = cfg.hydra.sweeper
        assert (s.direction, s.n_trials, s.sampler.kind, s.sampler.seed) == ("maximize", *SEARCHES[name], 123)
        assert all(OmegaConf.select(cfg, key) is not None for key in params if key != "model")  # keys that exist
        assert cfg.search.pruner == "median" and cfg.search.storage == "auto"  # persistent, pruned
        return
    for job in grid_jobs(params):  # every job's config is valid and keeps the preset's dataset
        composed = config.validate(compose_config([f"sweep={name}", job]))
        key, value = job.split("=")
        chosen = composed.model.cell if key == "model" else OmegaConf.select(composed, key)
        assert str(chosen) == {"bilstm": "lstm"}.get(value, value) and composed.data.name == dataset, job


@pytest.mark.parametrize("name", sorted(SWEEPS))
@pytest.mark.parametrize("order", ["budget last", "budget first"])
def test_the_smoke_budget_wins_over_a_sweep_preset(name, order):
    overrides = [f"sweep={name}", "budget=smoke"]
    cfg = compose_config(overrides if order == "budget last" else overrides[::-1], hydra=True)
    t = cfg.trainer
    assert (t.epochs, t.max_steps_per_epoch, t.max_eval_batches, t.generate_words) == (2, 3, 2, 5)
    assert cfg.hydra.mode == RunMode.MULTIRUN and OmegaConf.to_container(cfg.hydra.sweeper.params) == SWEEPS[name][3]
    assert cfg.data.name == SWEEPS[name][0]  # the sweep is the same, only shorter


# --- Real sweeps -----------------------------------------------------------------------------------------------
def launch(tmp_path, *args, wait=True):
    """``python -m pipeline.train -m`` with the smoke budget on the small toy data; the finished process, or the
    running one with ``wait=False``."""
    env = {**os.environ}
    env.pop("RNNLAB_ROOT", None)
    env.pop("RNNLAB_SWEEP_PARENT_RUN_ID", None)
    cmd = [
        sys.executable,
        "-m",
        "pipeline.train",
        "-m",
        f"paths.root={tmp_path}",
        "budget=smoke",
        "trainer.verbose=0",
        *SMALL,
        *args,
    ]
    if not wait:
        return subprocess.Popen(  # a session of its own: a test can kill -9 the whole group, workers and all
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def multirun(tmp_path, *args):
    done = launch(tmp_path, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def sweep_runs(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("rnnlab-toy")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep_role") != "parent"]
    return client, parents, children


@pytest.mark.integration
@pytest.mark.parametrize("launcher", ["basic", "parallel"])
def test_two_by_two_sweep_is_one_parent_with_four_children(make_cfg, tmp_path, launcher):
    prepare.run(make_cfg(*SMALL))
    extra = ["hydra/launcher=parallel"] if launcher == "parallel" else []
    multirun(tmp_path, "model=rnn,gru", "optimizer=adam,rmsprop", "tracking.sweep_name=grid", *extra)
    client, parents, children = sweep_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "grid"
    assert parent.data.params["model"] == "rnn,gru" and parent.data.params["optimizer"] == "adam,rmsprop"
    assert parent.data.metrics["sweep/children"] == 4 and parent.data.metrics["sweep/finished"] == 4
    combos = set()
    for child in children:
        tags = child.data.tags
        assert child.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["sweep"] == "grid" and tags["dataset"] == "toy" and tags["cell"] in ("rnn", "gru")
        combos.add((tags["cell"], child.data.params["optimizer.name"]))
        # Nothing lost to concurrent writers: every epoch of every metric arrived.
        for key in ("train/loss", "val/loss", "val/accuracy"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == [0, 1]
        assert "test/accuracy" in child.data.metrics
        logged = Path(client.download_artifacts(child.info.run_id, "config.yaml", str(tmp_path))).read_text()
        assert f"intra_op_threads: {1 if launcher == 'parallel' else 0}\n" in logged  # a runtime key: not a param
    assert combos == {(c, o) for c in ("rnn", "gru") for o in ("adam", "rmsprop")}


@pytest.mark.integration
def test_a_seeded_two_config_sweep_is_one_parent_six_children_and_two_aggregated_rows(make_cfg, tmp_path):
    prepare.run(make_cfg(*SMALL))
    multirun(tmp_path, "model=rnn,gru", "seeds=3", "tracking.sweep_name=seeded", "hydra/launcher=parallel")
    client, (parent,), children = sweep_runs(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.params["seed"] == "1,2,3" and len(children) == 6
    by_config: dict[str, list] = {}
    for child in children:
        by_config.setdefault(child.data.tags["config_id"], []).append(child)
    assert len(by_config) == 2  # the cells differ, the seeds do not make new configurations
    for runs in by_config.values():
        assert (
            sorted(int(r.data.tags["seed"]) for r in runs) == [1, 2, 3]
            and len({r.data.tags["cell"] for r in runs}) == 1
        )
    inputs = children[0].inputs.dataset_inputs  # the prepared splits, as MLflow datasets with DVC's digests
    assert sorted((i.dataset.name, i.tags[0].value) for i in inputs) == [
        ("toy.test", "test"),
        ("toy.train", "train"),
        ("toy.val", "val"),
    ]
    assert all(len(i.dataset.digest) == 32 for i in inputs)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # The parent carries the comparison: the table as an artifact, each configuration's mean and interval as metrics.
    metrics = client.get_run(parent.info.run_id).data.metrics
    assert {"GRU/test_accuracy_mean", "SimpleRNN/test_accuracy_mean", "GRU/test_accuracy_ci_low"} <= set(metrics)
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "comparison/comparison.csv", str(tmp_path)))
    assert sorted(table["label"]) == ["GRU", "SimpleRNN"] and list(table["n"]) == [3, 3]
    gru = [c.data.metrics["test/accuracy"] for c in children if c.data.tags["cell"] == "gru"]
    assert metrics["GRU/test_accuracy_mean"] == pytest.approx(sum(gru) / 3)
    assert parent.data.tags.get("headline") or client.get_run(parent.info.run_id).data.tags["headline"]


@pytest.mark.integration
def test_a_sweep_with_failed_jobs_exits_1_and_its_parent_run_is_failed(make_cfg, tmp_path):
    """One job diverges (its run FAILED), two fail before their run exists (a typo): the sweep must not say FINISHED."""
    prepare.run(make_cfg(*SMALL))
    done = launch(tmp_path, "model.cell=gru,lstn", "optimizer.learning_rate=0.01,1e12", "tracking.sweep_name=bad")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert "sweep FAILED: not every job finished" in output
    client, (parent,), children = sweep_runs(tmp_path)
    assert parent.info.status == "FAILED"
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    metrics = client.get_run(parent.info.run_id).data.metrics
    assert (metrics["sweep/jobs"], metrics["sweep/children"], metrics["sweep/finished"]) == (4, 2, 1)


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.integration
@pytest.mark.parametrize("launcher", ["basic", "parallel"])
def test_sigterm_to_a_sweep_kills_its_parent_run_and_every_worker(make_cfg, tmp_path, launcher):
    prepare.run(make_cfg(*SMALL))
    extra = ["hydra/launcher=parallel"] if launcher == "parallel" else []
    proc = launch(tmp_path, "model=rnn,gru", "trainer.epochs=200", *extra, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "checkpoints").glob("*/state.json")):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.1)
    workers = descendants(proc.pid)
    assert launcher == "basic" or workers, "the parallel launcher started no worker processes"
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    deadline = time.time() + 30
    while time.time() < deadline and any(alive(p) for p in workers):
        time.sleep(0.2)
    assert not [p for p in workers if alive(p)], "workers outlived the sweep"
    _, (parent,), children = sweep_runs(tmp_path)
    assert parent.info.status == "KILLED"
    assert children and all(c.info.status in ("KILLED", "FINISHED") for c in children), [
        c.info.status for c in children
    ]
    assert "Traceback" not in output, output[-3000:]


# --- Resuming an interrupted sweep -----------------------------------------------------------------------------
def finished_children(tmp_path) -> dict[tuple[str, str], dict[str, float]]:
    """The FINISHED children of the one sweep parent, by (cell, seed), with their metrics."""
    _, (parent,), children = sweep_runs(tmp_path)
    done = [c for c in children if c.info.status == "FINISHED"]
    keys = [(c.data.tags["config_id"], c.data.tags["seed"]) for c in done]
    assert len(keys) == len(set(keys)), f"a job FINISHED twice: {keys}"
    return {(c.data.tags["cell"], c.data.tags["seed"]): c.data.metrics for c in done}


def sigterm_after_finished(proc, tmp_path, count: int) -> str:
    """SIGTERM the sweep once ``count`` of its children have FINISHED and another has checkpointed an epoch (the
    store exists before the sweep starts: a second process creating its tables at the same time breaks it)."""
    db = tmp_path / "mlflow.db"
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        if db.exists():
            try:
                _, _, children = sweep_runs(tmp_path)
                finished = {c.info.run_id for c in children if c.info.status == "FINISHED"}
                saved = {p.parent.name for p in tmp_path.glob("checkpoints/*/state.json")}  # a finished run's goes
                if len(finished) >= count and saved - finished:
                    break
            except (ValueError, AttributeError, TypeError):  # the parent or the experiment does not exist yet
                pass
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    return output


RESUMABLE = ["model=rnn,gru", "seeds=2", "trainer.epochs=15"]  # 2 cells x 2 seeds, jobs long enough to stop


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The RESUMABLE sweep run once without a stop (basic launcher): the results every interrupted run must match."""
    root = tmp_path_factory.mktemp("uninterrupted")
    prepare.run(compose_config([f"paths.root={root}", *SMALL]))
    multirun(root, *RESUMABLE)
    return finished_children(root)


def assert_same_results(results: dict, expected: dict) -> None:
    assert sorted(results) == sorted(expected) == [(c, s) for c in ("gru", "rnn") for s in ("1", "2")]
    for job, values in expected.items():
        for key in ("test/accuracy", "test/loss", "val/loss"):
            assert results[job][key] == pytest.approx(values[key], rel=1e-5), (job, key)


@pytest.mark.integration
@pytest.mark.parametrize("launcher", ["basic", "parallel"])
def test_an_interrupted_sweep_rerun_finishes_under_its_parent_with_an_uninterrupted_sweeps_results(
    make_cfg, mlflow_store, tmp_path, launcher, uninterrupted
):
    """2 cells x 2 seeds, SIGTERM'd after its second job finished, then the same command again: one parent, four
    FINISHED children (one per job), the same metrics as the same sweep run without a stop."""
    prepare.run(make_cfg(*SMALL))
    args = [*RESUMABLE, "tracking.sweep_name=resumable"]
    args += ["hydra/launcher=parallel"] if launcher == "parallel" else []
    sigterm_after_finished(launch(tmp_path, *args, wait=False), tmp_path, 2)
    _, (parent,), _ = sweep_runs(tmp_path)
    assert parent.info.status == "KILLED"
    output = multirun(tmp_path, *args)
    assert "resuming this job's KILLED run" in output  # from the checkpoint it had (not afresh)
    assert "resuming its KILLED parent run" in output and output.count("skipped: this sweep FINISHED") >= 2
    client, (again,), children = sweep_runs(tmp_path)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    metrics = client.get_run(parent.info.run_id).data.metrics
    assert (metrics["sweep/jobs"], metrics["sweep/finished"]) == (4, 4)
    assert_same_results(finished_children(tmp_path), uninterrupted)


# --- A real cluster: single-node SLURM (scripts/slurm-local.sh) -------------------------------------------------
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",  # the script's one partition
    "hydra.launcher.cpus_per_task=1",  # the node has the machine's cores: two jobs at once on two
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=10",
]


@pytest.fixture(scope="module")
def slurm():
    """A single-node SLURM cluster on this machine (installed and started by scripts/slurm-local.sh); skipped with
    the script's reason where it cannot start, except in CI."""
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "slurm-local.sh"), "start"], capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"slurm-local.sh start exited {done.returncode}"])[-1]
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.mark.integration
def test_a_seeded_sweep_on_slurm_interrupted_and_resumed_matches_the_local_launcher(
    slurm, make_cfg, mlflow_store, tmp_path, uninterrupted
):
    """2 cells x 2 seeds through SLURM, SIGTERM'd after two jobs (its SLURM jobs are cancelled), the same command
    again: one parent, four FINISHED children, the metrics of the same sweep run locally."""
    prepare.run(make_cfg(*SMALL))
    args = [*RESUMABLE, "tracking.sweep_name=on_slurm"]
    output = sigterm_after_finished(launch(tmp_path, *args, *SLURM, wait=False), tmp_path, 2)
    assert "cancelling the sweep's SLURM jobs" in output
    assert not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip()  # none left
    multirun(tmp_path, *args, *SLURM)
    client, (parent,), children = sweep_runs(tmp_path)
    assert parent.info.status == "FINISHED"
    assert client.get_run(parent.info.run_id).data.metrics["sweep/finished"] == 4
    assert_same_results(finished_children(tmp_path), uninterrupted)


# What scontrol and squeue print, captured from the single-node cluster of scripts/slurm-local.sh (slurm-wlm 22.05);
# the gpu partition and node are the same lines with a GPU node's values (long lines go on after a backslash).
PARTITIONS = """\
PartitionName=debug AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES QoS=N/A \
DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED MaxTime=UNLIMITED \
MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=vm PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO \
OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=2 TotalNodes=1 SelectTypeParameters=NONE \
JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED TRES=cpu=2,mem=22900M,node=1,billing=2
PartitionName=gpu AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=NO QoS=N/A DefaultTime=NONE \
DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=2 MaxTime=2-00:00:00 MinNodes=0 LLN=NO \
MaxCPUsPerNode=UNLIMITED Nodes=gpu[01-04] PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO \
OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=256 TotalNodes=4 SelectTypeParameters=NONE \
JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED \
TRES=cpu=256,mem=2060000M,node=4,billing=256,gres/gpu=16
"""
NODES = """\
NodeName=vm Arch=x86_64 CoresPerSocket=1  CPUAlloc=0 CPUEfctv=2 CPUTot=2 CPULoad=2.70 AvailableFeatures=(null) \
ActiveFeatures=(null) Gres=(null) NodeAddr=127.0.0.1 NodeHostName=vm Version=22.05.8 OS=Linux 6.18.44-fc-v1252 #1 \
SMP PREEMPT_DYNAMIC @0  RealMemory=22900 AllocMem=0 FreeMem=21861 Sockets=2 Boards=1 State=IDLE ThreadsPerCore=1 \
TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=debug  BootTime=2026-12-03T19:43:59 \
SlurmdStartTime=2026-12-03T23:19:47 LastBusyTime=2026-12-03T23:19:47 CfgTRES=cpu=2,mem=22900M,billing=2 AllocTRES= \
CapWatts=n/a CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s
NodeName=gpu01 Arch=x86_64 CoresPerSocket=32  CPUAlloc=0 CPUEfctv=62 CPUTot=64 CPULoad=0.10 AvailableFeatures=a100 \
ActiveFeatures=a100 Gres=gpu:a100:4(S:0-1) NodeAddr=gpu01 NodeHostName=gpu01 Version=22.05.8 OS=Linux \
5.15.0-91-generic #101-Ubuntu SMP Tue Nov 14 13:30:08 UTC 2023  RealMemory=515000 AllocMem=0 FreeMem=501234 \
Sockets=2 Boards=1 State=IDLE ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=gpu,debug  \
BootTime=2026-12-01T08:00:00 SlurmdStartTime=2026-12-01T08:01:00 LastBusyTime=2026-12-03T23:19:47 \
CfgTRES=cpu=64,mem=515000M,billing=64,gres/gpu=4 AllocTRES= CapWatts=n/a CurrentWatts=0 AveWatts=0 \
ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s
"""
SQUEUE = """\
20_[0-1%16] PD PartitionConfig
21_0 R None
21_[1%16] PD Resources
22 PD Priority
"""


def test_a_slurm_request_no_node_of_the_partition_can_meet_is_named_with_the_value_that_fits():
    partitions = sweep.scontrol_records(PARTITIONS)
    nodes = sweep.scontrol_records(NODES)[:1]  # the debug node alone
    assert [p["PartitionName"] for p in partitions] == ["debug", "gpu"] and nodes[0]["OS"] == "Linux"  # free text
    debug = sweep.find_partition(partitions, nodes, None)  # partition: null = the one with Default=YES
    assert debug == sweep.Partition("debug", cpus=2, mem_mb=22900, gpus=0, nodes=1, max_time="UNLIMITED")
    launcher = compose_config(["hydra/launcher=slurm"], hydra=True).hydra.launcher  # cpus_per_task: 4, mem_gb: 16
    assert sweep.request_problems(launcher, debug) == [
        "hydra.launcher.cpus_per_task=4 asks for more CPUs than any node of partition 'debug' has (2): "
        "set hydra.launcher.cpus_per_task=2 (or less)"
    ]
    assert sweep.request_problems({**launcher, "cpus_per_task": 2}, debug) == []
    assert sweep.find_partition(partitions, sweep.scontrol_records(NODES), "debug").cpus == 62  # gpu01's too
    assert sweep.request_problems({**launcher, "cpus_per_task": 1, "tasks_per_node": 2}, debug) == []
    assert sweep.request_problems({**launcher, "cpus_per_task": 2, "tasks_per_node": 2}, debug) == [
        "hydra.launcher.cpus_per_task=2 asks for more CPUs than any node of partition 'debug' has (2) for 2 tasks: "
        "set hydra.launcher.cpus_per_task=1 (or less)"
    ]

    gpu = sweep.find_partition(partitions, sweep.scontrol_records(NODES), "gpu")
    assert gpu == sweep.Partition("gpu", cpus=62, mem_mb=515000, gpus=4, nodes=2, max_time="2-00:00:00")
    asked = {**launcher, "cpus_per_task": 62, "mem_gb": 503, "gpus_per_node": 8, "nodes": 3, "timeout_min": 2881}
    assert sweep.request_problems(asked, gpu) == [
        "hydra.launcher.mem_gb=503 asks for more memory than any node of partition 'gpu' has (515000 MB): "
        "set hydra.launcher.mem_gb=502 (or less)",
        "hydra.launcher.gpus_per_node=8 asks for more GPUs than any node of partition 'gpu' has (4): "
        "set hydra.launcher.gpus_per_node=4 (or less)",
        "hydra.launcher.nodes=3 asks for more nodes than partition 'gpu' allows (2): "
        "set hydra.launcher.nodes=2 (or less)",
        "hydra.launcher.timeout_min=2881 is longer than partition 'gpu' allows (MaxTime=2-00:00:00): "
        "set hydra.launcher.timeout_min=2880 (or less)",
    ]
    assert sweep.request_problems({**launcher, "gpus_per_node": 1}, debug)[-1].endswith("gpus_per_node=0")
    with pytest.raises(sweep.SweepError, match=r"partition='nope': no such partition .* set one of: debug, gpu$"):
        sweep.find_partition(partitions, nodes, "nope")


@pytest.mark.parametrize(
    "text, minutes",
    [("UNLIMITED", math.inf), ("30", 30), ("30:30", 30.5), ("02:00:00", 120), ("1-00:00:00", 1440), ("2-12", 3600)],
)
def test_slurm_time_limits_read_as_minutes(text, minutes):
    assert sweep.slurm_minutes(text) == minutes


def test_only_a_pending_reason_that_waiting_never_resolves_stops_a_slurm_sweep():
    assert sweep.stuck_job(SQUEUE) == (
        f"SLURM job 20 can never start (pending, reason PartitionConfig): {sweep.NEVER_STARTS['PartitionConfig']}"
    )
    assert "hydra.launcher.cpus_per_task" in sweep.NEVER_STARTS["PartitionConfig"]
    assert sweep.stuck_job(SQUEUE.replace("PartitionConfig", "Resources")) is None  # the jobs run once others end
    assert sweep.stuck_job("") is None
    for reason in ("QOSMaxCpuPerJobLimit", "QOSMaxWallDurationPerJobLimit", "AssocMaxNodePerJobLimit", "QOSMinGRES"):
        assert sweep.never_starts(reason) == sweep.PER_JOB_FIX
    for reason in ("Resources", "Priority", "QOSGrpCpuLimit", "ReqNodeNotAvail", "BeginTime", "Dependency"):
        assert sweep.never_starts(reason) is None  # each resolves by waiting


def test_without_a_working_scontrol_a_slurm_sweep_is_not_checked_only_warned(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM commands on it
    launcher = compose_config(["hydra/launcher=slurm"], hydra=True).hydra.launcher
    sweep.check_slurm_request(launcher)  # no error: the sweep goes on unchecked
    assert "could not check the SLURM jobs' request" in caplog.text
    down = "slurm_load_partitions: Unable to contact slurm controller (connect failure)"  # what scontrol then says
    (tmp_path / "scontrol").write_text(f"#!/bin/sh\necho '{down}' >&2\nexit 1\n")
    (tmp_path / "scontrol").chmod(0o755)
    sweep.check_slurm_request(launcher)
    assert f"(scontrol: {down}); going on" in caplog.text


def running_runs(uri: str) -> list[str]:
    """Every run of the store still RUNNING (none should be, once a sweep ended)."""
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(experiments) if r.info.status == "RUNNING"] if experiments else []


def ends_by_itself(proc, tmp_path, seconds: float) -> str:
    """The output of a sweep that must end on its own within ``seconds``: else it is killed, its SLURM jobs are
    cancelled and the test fails."""
    try:
        return proc.communicate(timeout=seconds)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        for folder in tmp_path.glob("multirun/*/*"):
            sweep.cancel_cluster_jobs(str(folder))
        pytest.fail(f"the sweep was still waiting after {seconds} s:\n{proc.communicate()[0][-3000:]}")


@pytest.mark.integration
def test_a_slurm_sweep_asking_more_cpus_than_the_node_has_stops_at_once_with_one_line(slurm, mlflow_store, tmp_path):
    """cpus_per_task=4 on the 2-CPU node: refused before anything is submitted or created, exit 1."""
    args = [a for a in SLURM if "cpus_per_task" not in a] + ["hydra.launcher.cpus_per_task=4"]
    start = time.monotonic()
    proc = launch(tmp_path, "model=rnn,gru", *args, wait=False)
    output = ends_by_itself(proc, tmp_path, 120)
    assert proc.returncode == 1 and time.monotonic() - start < 60, output[-3000:]
    (line,) = [line for line in output.splitlines() if "hydra.launcher.cpus_per_task" in line]
    assert line.endswith("(2): set hydra.launcher.cpus_per_task=2 (or less)")
    assert "Traceback" not in output and not list(tmp_path.glob("multirun/*/*/.submitit/*")), output[-3000:]
    assert not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip()
    assert running_runs(mlflow_store) == []


@pytest.mark.integration
def test_a_slurm_sweep_whose_jobs_can_never_start_is_cancelled_and_ends_failed(slurm, mlflow_store, tmp_path):
    """3 tasks of 1 CPU on one node of 2 (hydra.launcher.additional_parameters, which the check before submitting
    does not read): SLURM keeps the jobs pending (PartitionConfig); the watch cancels them, the sweep ends FAILED."""
    start = time.monotonic()
    proc = launch(tmp_path, "model=rnn,gru", *SLURM, "+hydra.launcher.additional_parameters.ntasks=3", wait=False)
    output = ends_by_itself(proc, tmp_path, 180)
    assert proc.returncode == 1 and time.monotonic() - start < 90, output[-3000:]
    (line,) = [line for line in output.splitlines() if "can never start" in line]
    assert "reason PartitionConfig" in line and "hydra.launcher.cpus_per_task" in line
    assert "cancelling the sweep's SLURM jobs" in output and "Traceback" not in output, output[-3000:]
    assert not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip()  # none left
    client = MlflowClient(mlflow_store)
    (parent,) = client.search_runs([client.get_experiment_by_name("rnnlab-toy").experiment_id])
    assert parent.info.status == "FAILED" and running_runs(mlflow_store) == []


# --- A search that outlives its process -------------------------------------------------------------------------
@pytest.mark.integration
def test_an_interrupted_search_continues_the_same_study_at_its_next_trial(make_cfg, mlflow_store, tmp_path):
    """A search of 4 trials, two at a time (parallel launcher), SIGTERM'd once two trials finished: the same
    command continues the study in the journal beside the MLflow store: the two interrupted trials run again under
    their own numbers and params (their runs resume), nothing is repeated, one parent holds four trials."""
    import optuna

    prepare.run(make_cfg(*SMALL))
    args = [
        "sweep=tune_cells_toy",
        "hydra.sweeper.params.model=gru",
        "hydra.sweeper.n_trials=4",
        "trainer.epochs=15",
        "hydra/launcher=parallel",
    ]
    sigterm_after_finished(launch(tmp_path, *args, wait=False), tmp_path, 2)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "mlflow-optuna.journal"))
    )
    (summary,) = optuna.get_all_study_summaries(storage)
    before = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    states = sorted((t.number, t.state.name) for t in before)
    assert states == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "RUNNING"), (3, "RUNNING")]

    output = multirun(tmp_path, *args)
    assert "2 of 4 trials done, 2 to run again" in output
    assert "resuming this job's KILLED run" in output  # a stopped trial continues its own run from its checkpoint
    after = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    assert [t.number for t in after] == [0, 1, 2, 3] and all(t.state.name == "COMPLETE" for t in after)
    assert [t.params for t in after[2:]] == [t.params for t in before[2:]]  # the same trials, not new draws
    client, (parent,), children = sweep_runs(tmp_path)
    done = [c for c in children if c.info.status == "FINISHED"]
    assert parent.info.status == "FINISHED" and sorted(int(c.data.tags["trial"]) for c in done) == [0, 1, 2, 3]
    assert {c.data.tags["study"] for c in done} == {summary.study_name}
    on_parent = client.get_run(parent.info.run_id).data.metrics  # the tuning summary, not a table of trials
    assert {"GRU/expected_best_at_1", "GRU/expected_best_at_4"} <= set(on_parent)
    for trial in after:  # each trial's value is its run's best validation accuracy
        (run,) = [c for c in done if c.data.tags["trial"] == str(trial.number)]
        history = client.get_metric_history(run.info.run_id, "val/accuracy")
        assert trial.value == pytest.approx(max(m.value for m in history))
    first, second = sorted(done, key=lambda c: int(c.data.tags["trial"]))[:2]
    assert first.info.start_time < second.info.end_time and second.info.start_time < first.info.end_time  # 2 at once


# --- Which parent a sweep command continues, and how a parent ends ----------------------------------------------
def test_the_same_sweep_command_continues_its_unfinished_parent_and_only_that(tmp_path, mlflow_store):
    def start(*extra):
        return tracking.start_sweep(compose_config([f"paths.root={tmp_path}", "sweep=cells_toy", *extra], hydra=True))

    client = MlflowClient(mlflow_store)
    first = start()
    client.set_terminated(first, status="KILLED")
    assert start("trainer.verbose=2") == first  # how it runs is not what it runs: the same sweep, continued
    assert client.get_run(first).info.status == "RUNNING" and client.get_run(first).data.tags["sweep_resumed"] == "1"
    client.set_terminated(first, status="KILLED")
    live = tracking.RunLock(tmp_path / "checkpoints", first).acquire()  # its process lives: no second one
    with pytest.raises(tracking.TrackingError, match="is running right now"):
        start()
    live.release()
    assert start("model.units=8") != first  # another sweep: a parent of its own
    fresh = start("sweep.resume=false")
    assert fresh != first and client.get_run(first).info.status == "KILLED"  # false: a new parent, the old untouched
    client.set_terminated(fresh, status="FINISHED")
    client.set_terminated(first, status="FINISHED")
    with pytest.raises(tracking.TrackingError, match="no unfinished sweep"):
        start("sweep.resume=true")  # FINISHED sweeps are complete: nothing to continue


def child(client, parent, status, **tags):
    experiment = client.get_run(parent).info.experiment_id
    run = client.create_run(experiment, tags={"mlflow.parentRunId": parent, **tags})
    client.set_terminated(run.info.run_id, status=status)


def test_a_search_with_a_diverged_trial_finishes_a_grid_with_a_failed_job_does_not(tmp_path, mlflow_store):
    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("rnnlab-toy", artifact_location=(tmp_path / "a").as_uri())
    search = client.create_run(experiment, tags={"sweep_role": "parent"}).info.run_id
    child(client, search, "FINISHED", study="s", trial="0", trial_state="COMPLETE")
    child(client, search, "FAILED", study="s", trial="1")  # diverged: a result of the search
    child(client, search, "KILLED", study="s", trial="2")  # an attempt ...
    child(client, search, "FINISHED", study="s", trial="2", trial_state="PRUNED")  # ... then its resumed end
    assert tracking.finish_sweep(search, 3, uri=mlflow_store) == "FINISHED"
    metrics = client.get_run(search).data.metrics
    assert (metrics["sweep/jobs"], metrics["sweep/finished"], metrics["sweep/failed"]) == (3, 2, 1)
    grid = client.create_run(experiment, tags={"sweep_role": "parent"}).info.run_id
    child(client, grid, "FINISHED", config_id="a", seed="1")
    child(client, grid, "FAILED", config_id="a", seed="2")
    assert tracking.finish_sweep(grid, 2, uri=mlflow_store) == "FAILED"
    early = client.create_run(experiment, tags={"sweep_role": "parent"}).info.run_id
    child(client, early, "FINISHED", config_id="a", seed="1")  # and three jobs that failed before their run existed
    assert tracking.finish_sweep(early, 4, uri=mlflow_store) == "FAILED"
    metrics = client.get_run(early).data.metrics
    assert (metrics["sweep/finished"], metrics["sweep/failed"], metrics["sweep/without_run"]) == (1, 0, 3)
    resumed = client.create_run(experiment, tags={"sweep_role": "parent"}).info.run_id
    child(client, resumed, "KILLED")  # SIGTERM'd before its tags were logged: which job it was is unknown
    child(client, resumed, "FINISHED", config_id="a", seed="1")
    child(client, resumed, "FINISHED", config_id="a", seed="2")
    assert tracking.finish_sweep(resumed, 2, uri=mlflow_store) == "FINISHED"
    assert client.get_run(resumed).data.metrics["sweep/jobs"] == 2
    empty = client.create_run(experiment, tags={"sweep_role": "parent"}).info.run_id
    assert tracking.finish_sweep(empty, 0, uri=mlflow_store) == "EMPTY"  # a complete search, run again
    assert client.get_run(empty).info.lifecycle_stage == "deleted"


# --- kill -9: nothing is left RUNNING -------------------------------------------------------------------------------
def kill9_when(proc, tmp_path, ready) -> None:
    """``kill -9`` the sweep's whole process group (workers too) once ``ready(unfinished, saved)`` holds for its runs:
    ``unfinished`` the tagged children not FINISHED, ``saved`` the run ids with a checkpoint."""
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        try:
            _, _, children = sweep_runs(tmp_path)
        except (ValueError, AttributeError, TypeError):  # the store, the experiment or the parent is not there yet
            children = []
        unfinished = [c for c in children if c.info.status == "RUNNING" and "config_id" in c.data.tags]
        saved = {p.parent.name for p in tmp_path.glob("checkpoints/*/state.json")}
        if ready(unfinished, saved):
            break
        time.sleep(0.1)
    workers = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def before_a_checkpoint(unfinished, saved) -> bool:
    return any(c.info.run_id not in saved for c in unfinished)


def after_a_checkpoint(unfinished, saved) -> bool:
    return any(c.info.run_id in saved for c in unfinished)


KILLED_SWEEPS = {
    "grid": [*RESUMABLE, "tracking.sweep_name=killed"],
    "search": [
        "sweep=tune_cells_toy",
        "hydra.sweeper.params.model=gru",
        "hydra.sweeper.n_trials=4",
        "trainer.epochs=15",
    ],
}


@pytest.mark.integration
@pytest.mark.parametrize("kind", sorted(KILLED_SWEEPS))
def test_a_sweep_killed_9_before_and_after_a_checkpoint_then_rerun_leaves_no_run_running(
    make_cfg, mlflow_store, tmp_path, kind, uninterrupted
):
    """kill -9 of a sweep's process group (parallel launcher) while a job has not checkpointed yet, the same command
    again, kill -9 once a job has checkpointed, the same command to the end: every job FINISHED once, each run that
    died before its checkpoint ended KILLED and names the run that replaced it, the checkpointed one resumed, and no
    run is left RUNNING."""
    prepare.run(make_cfg(*SMALL))
    args = [*KILLED_SWEEPS[kind], "hydra/launcher=parallel"]
    kill9_when(launch(tmp_path, *args, wait=False), tmp_path, before_a_checkpoint)
    kill9_when(launch(tmp_path, *args, wait=False), tmp_path, after_a_checkpoint)
    output = multirun(tmp_path, *args)
    assert "resuming this job's RUNNING run" in output  # the checkpointed run continued, not started again
    client, (parent,), children = sweep_runs(tmp_path)
    assert parent.info.status == "FINISHED"
    assert not [c.info.run_id for c in children if c.info.status == "RUNNING"]
    superseded = [c for c in children if "superseded_by" in c.data.tags]
    assert superseded and all(c.info.status == "KILLED" for c in superseded)
    by_id = {c.info.run_id: c for c in children}
    for old in superseded:  # the replacement is the same job, and says what it replaced
        new = by_id[old.data.tags["superseded_by"]]
        key = ("study", "trial") if kind == "search" else ("config_id", "seed")
        assert [new.data.tags[k] for k in key] == [old.data.tags[k] for k in key]
        assert old.info.run_id in new.data.tags["supersedes"].split(",")
    if kind == "grid":
        assert_same_results(finished_children(tmp_path), uninterrupted)
    else:
        done = sorted(int(c.data.tags["trial"]) for c in children if c.info.status == "FINISHED")
        assert done == [0, 1, 2, 3]


def test_the_command_line_wins_over_a_named_sweeps_parameters_in_its_record_and_key():
    plain = compose_config(["sweep=cells_toy"], hydra=True).hydra
    more = OmegaConf.merge(plain, {"overrides": {"task": [*plain.overrides.task, "seed=1,2,3,4,5", "model=rnn,gru"]}})
    assert sweep.sweep_overrides(plain)["seed"] == "1,2,3"
    recorded = sweep.sweep_overrides(more)  # what Hydra's sweeper makes the jobs of: the command line wins
    assert (recorded["seed"], recorded["model"]) == ("1,2,3,4,5", "rnn,gru")
    assert sweep.sweep_key(recorded) != sweep.sweep_key(sweep.sweep_overrides(plain))  # another sweep
