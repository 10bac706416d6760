"""The sweep side of tracking: a Hydra multirun as one MLflow parent run with a child per job (``SweepCallback``),
the parent's truthful end, a resumed sweep's earlier attempts, and the comparison or tuning summary published on
the parent (``pipeline.compare``), so the dashboard compares cells without the report.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from hydra.experimental.callback import Callback
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pipeline import sweep
from pipeline.objective import of_runs
from pipeline.redaction import redact
from pipeline.tracking.runs import (
    ERROR_TAG_CHARS,
    ORPHAN_NOTE,
    SWEEP_ENV,
    SWEEP_STORE_ENV,
    RunLock,
    TrackingError,
    _chunks,
    _short,
    connect,
    metric_histories,
    open_store,
    setup_experiment,
)

log = logging.getLogger(__name__)


def finish_sweep(parent_id: str, jobs: int | None = None, stopped: str | None = None, uri: str | None = None) -> str:
    """End a sweep's parent run with the status that tells the truth: KILLED when ``stopped="interrupted"``
    (children still RUNNING, whose process is gone, end KILLED in every case), FAILED when ``stopped="crashed"``
    or when fewer jobs FINISHED than the ``jobs`` launched (a job can fail before its run exists), else FINISHED.
    A search is FINISHED when every trial ended and one finished: a diverged trial (its run FAILED) is one of its
    results.
    A parent that ran nothing and holds nothing (a search already complete) is deleted: "EMPTY"."""
    client = open_store(uri) if uri else MlflowClient()
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    if not children and not jobs and not stopped:
        client.delete_run(parent_id)
        log.info("nothing ran and nothing was left to run: the empty parent run %s is deleted", parent_id)
        return "EMPTY"
    for child in children:  # one process runs a sweep: a child RUNNING now lost its process (stopped, kill -9)
        if child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, status="KILLED")
            if not stopped:
                client.set_tag(child.info.run_id, "mlflow.note.content", ORPHAN_NOTE)
    # A job is a (config_id, seed): a resumed sweep may hold a KILLED attempt of it beside the run that finished it.
    # A KILLED attempt stopped before its run was tagged cannot be told which job it was: the jobs launched count it.
    attempts = {}
    for child in children:
        if not _tagged(child) and client.get_run(child.info.run_id).info.status == "KILLED":
            continue
        attempts.setdefault(_job_key(child), set()).add(client.get_run(child.info.run_id).info.status)
    finished = sum("FINISHED" in states for states in attempts.values())
    failed = sum("FINISHED" not in states and "FAILED" in states for states in attempts.values())
    jobs = max(jobs or 0, len(attempts))
    runless = jobs - len(attempts)  # jobs that ended before their run started (a config error, a crash at start)
    client.log_batch(
        parent_id,
        metrics=[
            Metric(key, value, int(time.time() * 1000), 0)
            for key, value in [
                ("sweep/jobs", jobs),
                ("sweep/children", len(children)),
                ("sweep/finished", finished),
                ("sweep/failed", failed),
                ("sweep/without_run", runless),
            ]
        ],
    )
    search = any("study" in c.data.tags for c in children)
    done = finished + failed == jobs and finished > 0 if search else finished == jobs
    status = "KILLED" if stopped == "interrupted" else "FINISHED" if jobs and done and not stopped else "FAILED"
    try:  # the comparison is a convenience: it never changes what the sweep's status says
        log_comparison(client, parent_id)
    except Exception as err:
        log.warning("could not log the sweep's comparison on its parent run %s: %s", parent_id, _short(err))
    client.set_terminated(parent_id, status=status)
    without = f", {runless} ended before their run started (their error is in the log above)" if runless else ""
    log.info(
        "sweep %s: %d of %d jobs launched FINISHED, %d FAILED%s (parent %s)",
        status,
        finished,
        jobs,
        failed,
        without,
        parent_id,
    )
    return status


def _tagged(run) -> bool:
    return "study" in run.data.tags or "config_id" in run.data.tags


def _job_key(run) -> tuple[str, str]:
    """A grid job is a configuration and a seed; a search job is its study's trial (two trials may share values)."""
    tags = run.data.tags
    if "study" in tags:
        return (tags["study"], tags.get("trial", ""))
    return (tags.get("config_id", run.info.run_id), tags.get("seed", ""))


def _metric_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)


def log_comparison(client: MlflowClient, parent_id: str) -> pd.DataFrame | None:
    """A sweep's FINISHED children aggregated over seeds (``pipeline.compare``), on its parent run: the table and
    headline as artifacts (``comparison/``), each configuration's test mean, std and 95% interval as metrics
    ``<label>/test_<metric>_mean`` etc., so the dashboard compares without the report. Returns the table."""
    from pipeline import compare  # here, not above: its SciPy import would cost every training run 0.6 s

    experiment_id = client.get_run(parent_id).info.experiment_id
    mlflow.set_tracking_uri(client.tracking_uri)
    runs = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'",
        output_format="pandas",
    )
    if "tags.study" in runs and runs["tags.study"].notna().any():
        failed = mlflow.search_runs(  # diverged trials count in a search's curve
            [experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FAILED'",
            output_format="pandas",
        )
        log_tuning(client, parent_id, pd.concat([runs, failed], ignore_index=True))
        return None
    if runs.empty:
        return None
    objective = of_runs(runs)
    curves = metric_histories(client.tracking_uri, list(runs["run_id"]), [objective.val, "perf/epoch_seconds"])
    table = compare.aggregate(compare.per_run(runs, curves, objective), objective)
    headline = compare.headline(client.get_run(parent_id).info.run_name, table, objective)
    client.log_text(parent_id, table.to_csv(index=False), "comparison/comparison.csv")
    columns = ["label", "n", "test_mean", "test_std", "test_ci_low", "test_ci_high", "val_mean", "verdict"]
    body = f"{headline}\n\nStatistics: {compare.TEST}.\n\n{table[columns].round(4).to_markdown(index=False)}\n"
    client.log_text(parent_id, body, "comparison/comparison.md")
    now = int(time.time() * 1000)
    metrics = [
        Metric(_metric_key(f"{row['label']}/test_{objective.metric}_{stat}"), float(row[f"test_{stat}"]), now, 0)
        for _, row in table.iterrows()
        for stat in ("mean", "std", "ci_low", "ci_high")
        if pd.notna(row[f"test_{stat}"])
    ]
    for chunk in _chunks(metrics, 500):
        client.log_batch(parent_id, metrics=chunk)
    client.set_tag(parent_id, "headline", redact(headline)[:ERROR_TAG_CHARS])
    return table


def log_tuning(client: MlflowClient, parent_id: str, runs: pd.DataFrame) -> None:
    """A search's parent: per study (cell) its trials, pruned trials, best trial and expected best of 1 and of all
    trials (``comparison/tuning.{csv,md}``, metrics ``<cell>/expected_best_at_<n>``), not a table of its trials."""
    from pipeline import compare  # as in log_comparison

    objective = of_runs(compare.completed(runs))
    curves = metric_histories(client.tracking_uri, list(runs["run_id"]), [objective.val])
    summary = compare.tuning_summary(compare.trials(runs, curves, objective), objective)
    client.log_text(parent_id, summary.to_csv(index=False), "comparison/tuning.csv")
    client.log_text(
        parent_id, f"{compare.TUNING}.\n\n{summary.round(4).to_markdown(index=False)}\n", "comparison/tuning.md"
    )
    now = int(time.time() * 1000)
    metrics = [
        Metric(_metric_key(f"{row['cell']}/expected_best_at_{n}"), float(row[column]), now, 0)
        for _, row in summary.iterrows()
        for n, column in ((1, "expected_at_1"), (int(row["trials"]), "expected_at_all"))
        if pd.notna(row[column])
    ]
    client.log_batch(parent_id, metrics=metrics)


def abandon_sweep(interrupted: bool) -> None:
    """The sweep of this process stopped before Hydra's end-of-sweep callback: end its parent run truthfully."""
    parent = os.environ.pop(SWEEP_ENV, None)
    if not parent:
        return
    try:
        finish_sweep(parent, stopped="interrupted" if interrupted else "crashed", uri=os.environ.get(SWEEP_STORE_ENV))
    except Exception as err:  # the store may be why the sweep stopped
        log.warning("could not end the sweep's parent run %s: %s", parent, _short(err))


NAME_CHARS = 250  # MLflow's limit on run names and tag keys' values in SQL stores


def start_sweep(config: DictConfig) -> str:
    """The sweep's parent run: with ``sweep.resume`` auto or true, the newest unfinished parent of the same sweep
    (same overrides, see ``sweep.sweep_key``) reopened; else a new one named after the sweep (or its overrides),
    the overrides as params."""
    overrides = sweep.sweep_overrides(config.hydra)
    # Children of a sweep over datasets would otherwise land in several experiments: keep them together.
    tracking_cfg = OmegaConf.to_container(config.tracking, resolve=True)
    if "data" in overrides and "," in overrides["data"]:
        tracking_cfg["experiment"] = "rnnlab-sweeps"
    client = connect(OmegaConf.create(tracking_cfg))
    experiment_id = setup_experiment(OmegaConf.create(tracking_cfg), client)
    key = sweep.sweep_key(overrides)
    mode = sweep.resume_mode(config.sweep.resume)
    if mode != "false" and (parent := _unfinished_sweep(client, experiment_id, key)):
        holder = RunLock(config.paths.checkpoints, parent.info.run_id).holder()
        if holder:  # a live sweep: continuing it from here would run its jobs twice
            raise TrackingError(f"this sweep (parent run {parent.info.run_id}) is running right now ({holder})")
        client.update_run(parent.info.run_id, status="RUNNING")
        resumed = int(parent.data.tags.get("sweep_resumed", "0")) + 1
        client.set_tag(parent.info.run_id, "sweep_resumed", resumed)
        info = parent.info
        log.info("sweep %r: resuming its %s parent run %s", info.run_name, info.status, info.run_id)
        return parent.info.run_id
    if mode == "true":
        raise TrackingError(
            "sweep.resume=true: no unfinished sweep with these overrides in this experiment (FINISHED sweeps are "
            "complete). Drop sweep.resume to start a new one."
        )
    shown = " ".join(f"{k}={v}" for k, v in overrides.items() if not k.startswith(("paths.", "hydra")))
    name = redact(config.tracking.sweep_name or f"sweep {shown}")[:NAME_CHARS]
    tags = {"sweep": name, "sweep_role": "parent", "sweep_key": key}
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    params = [mlflow.entities.Param(k, v[:6000]) for k, v in overrides.items()]
    for chunk in _chunks(params, 100):
        client.log_batch(run.info.run_id, params=chunk)
    log.info("sweep %r: MLflow parent run %s", name, run.info.run_id)
    return run.info.run_id


def _unfinished_sweep(client: MlflowClient, experiment_id: str, key: str):
    """The newest parent run of the sweep ``key`` that did not finish (KILLED, FAILED, or RUNNING left by a crash)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.sweep_key = '{key}' and tags.sweep_role = 'parent' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def sweep_attempts(cfg: DictConfig, parent: str, tags: Mapping[str, Any], client: MlflowClient | None = None) -> list:
    """This job's earlier runs in the sweep ``parent``'s experiment, newest first, found by ``tags`` (``config_id``
    and ``seed`` for a grid job, under that parent; ``study`` and ``trial`` for a search trial, whichever parent
    ran it); empty when this job has not run before."""
    client = client or connect(cfg.tracking)
    experiment_id = client.get_run(parent).info.experiment_id
    where = [f"tags.{key} = '{value}'" for key, value in tags.items()]
    if "study" not in tags:
        where.append(f"tags.mlflow.parentRunId = '{parent}'")
    return client.search_runs([experiment_id], " and ".join(where), order_by=["attributes.start_time DESC"])


class SweepFailed(SystemExit):
    """A sweep in which some job did not finish: the process exits non-zero."""


class SweepCallback(Callback):
    """Hydra callback: a multirun becomes one MLflow parent run, named after the sweep with the overrides as
    params; each job's run is its child (see ``start_run``). The parent ends FINISHED when every child did,
    FAILED (and the command exits 1) otherwise. (``redaction.RedactCallback`` masks what Hydra saves.)"""

    def __init__(self) -> None:
        self.parent: str | None = None
        self.lock: RunLock | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:  # SLURM would keep jobs no node can run pending for ever: refuse them before anything is created
            sweep.check_slurm_request(config.hydra.launcher)
        except sweep.SweepError as err:
            log.error("%s", err)
            raise SweepFailed(1) from None
        sweep.watch_slurm_jobs(config)  # and stop the sweep on jobs pending for a reason waiting never resolves
        if not config.tracking.enabled:
            return
        try:
            self.parent = start_sweep(config)
            self.lock = RunLock(config.paths.checkpoints, self.parent).acquire()  # one live process per sweep
        except BlockingIOError:
            holder = RunLock(config.paths.checkpoints, self.parent).holder() or "another process"
            log.error(
                "this sweep (parent run %s) is running right now (%s): wait for it or stop it", self.parent, holder
            )
            raise SweepFailed(1) from None
        except Exception as err:  # Hydra would only warn and run the jobs without a parent: stop instead
            log.error("the sweep cannot start its MLflow parent run: %s", _short(err))
            raise SweepFailed(1) from err
        os.environ[SWEEP_ENV] = self.parent  # inherited by the jobs, in this process or the launcher's workers
        os.environ[SWEEP_STORE_ENV] = config.tracking.uri
        os.environ[sweep.SWEEP_DIR_ENV] = str(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.parent:
            return
        jobs = sum(p.is_dir() and p.name.isdigit() for p in Path(config.hydra.sweep.dir).iterdir())
        status = finish_sweep(self.parent, jobs)
        if self.lock:
            self.lock.release()
        if status == "EMPTY":
            status = "FINISHED"
        os.environ.pop(SWEEP_ENV, None)
        os.environ.pop(SWEEP_STORE_ENV, None)
        os.environ.pop(sweep.SWEEP_DIR_ENV, None)
        if status != "FINISHED":
            log.error(
                "sweep FAILED: not every job finished (parent run %s); a FAILED run's error tag says why, and a job "
                "that failed before its run started says so in the log above",
                self.parent,
            )
            raise SweepFailed(1)
