"""Training stage: train the configured model on a prepared dataset and track it in MLflow.

python -m pipeline.train                                 # toy task, LSTM, default budget
python -m pipeline.train experiment=ptb_small            # a named preset
python -m pipeline.train model=gru budget=smoke          # any group option
python -m pipeline.train -m model=rnn,lstm,gru           # a Hydra multirun sweep
python -m pipeline.train experiment=ptb_small trainer.resume=true    # continue an interrupted run
"""

from __future__ import annotations

import gc
import logging
import math
import shlex
import shutil
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import keras
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from pipeline import cells, config, data, models, sweep, tasks, tracking
from pipeline.checkpoint import Checkpoint, CheckpointError, save_model_atomic
from pipeline.objective import of_metrics
from pipeline.redaction import redact

log = logging.getLogger(__name__)

config.register()

TrainingError = tasks.TrainingError
PRESET_GROUPS = ("+experiment=", "+sweep=", "+budget=")
USER_ERRORS = (
    TrainingError,
    tracking.TrackingError,
    data.DataError,
    config.ConfigError,
    CheckpointError,
    sweep.SweepError,
    cells.CellError,
)


class Interrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C, SIGTERM); carries the run to continue."""

    def __init__(self, run_id: str | None, epochs_done: int, signum: int | None, unmarked: bool = False):
        super().__init__(run_id)
        self.run_id, self.epochs_done, self.signum, self.unmarked = run_id, epochs_done, signum, unmarked


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, a scheduler or `kill`, a closed terminal


@contextmanager
def sigterm_as_interrupt(interrupts: tracking.Interrupts):
    """Ctrl-C, SIGTERM and SIGHUP end training alike: the run is marked KILLED, the checkpoint kept. Each waits for
    a store write or a call into the compiled step under way (``tracking.Interrupts.held``)."""

    def handler(signum, frame):
        if interrupts.note(signum):
            raise KeyboardInterrupt(f"signal {signum}")

    try:  # one the process was started to ignore (nohup, a background job) stays ignored
        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    except ValueError:  # not the main thread (e.g. a parallel launcher): leave signals alone
        yield
        return
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


def size_to_budget(cfg: DictConfig, meta: dict[str, Any]) -> None:
    """With ``model.param_budget``, set ``model.units`` so the whole model has the parameter count nearest the
    budget (cells compared at equal capacity). Before seeding: sizing builds throw-away models."""
    budget = cfg.model.param_budget
    if not budget:
        return
    units, count = models.units_for_budget(cfg.model, meta, budget)
    log.info(
        "model.param_budget=%d: %d units give %d parameters (%+.2f%%)",
        budget,
        units,
        count,
        100 * (count - budget) / budget,
    )
    with open_dict(cfg):
        cfg.model.units = units


def resume_target(
    cfg: DictConfig, fingerprint: str, data_digest: str, client: Any = None
) -> tuple[str | None, tracking.RunLock | None, list[str]]:
    """The run to continue (``trainer.resume_run_id``, or with ``trainer.resume`` the newest unfinished run of the
    same config) and its lock, held from now on; (None, None, superseded) to start afresh, where ``superseded`` is
    a found run that left no checkpoint: the new run replaces it.

    A FINISHED run is complete and never reopened; a run that a live process is training is busy. Both are refused
    before the run is touched, so a mistaken resume changes nothing in the store."""
    run_id, found = cfg.trainer.resume_run_id, False
    if not run_id and cfg.trainer.resume:
        if not cfg.tracking.enabled:
            raise config.ConfigError("trainer.resume: resuming finds the run in MLflow; set tracking.enabled=true")
        run_id, found = tracking.find_resumable(cfg, fingerprint, client), True
        if run_id is None:
            log.warning("trainer.resume: no unfinished run with this config (hash %s); starting afresh", fingerprint)
            return None, None, []
    if not run_id:
        return None, None, []
    described = tracking.describe_run(cfg.tracking, run_id, client=client) if cfg.tracking.enabled else {}
    status = described.get("status", "KILLED")
    if status == "FINISHED":
        raise TrainingError(
            f"run {run_id} is FINISHED: it is complete and is never reopened. To train it further, start a new run "
            "(drop trainer.resume_run_id / trainer.resume), e.g. with more trainer.epochs."
        )
    problem = same_run(cfg, fingerprint, data_digest, described)
    if problem and found:  # the user asked to continue this config: that run trained on other data
        log.warning("trainer.resume: run %s %s: training afresh in a new run", run_id, problem)
        return None, None, []
    if problem:
        raise config.ConfigError(f"trainer.resume_run_id={run_id}: {problem}; resume it as it started, or start anew")
    lock = lock_run(cfg, run_id)
    folder = Path(cfg.paths.checkpoints) / run_id
    if Checkpoint(folder).exists():
        return run_id, lock, []
    lock.release()
    if found:  # the user asked to continue this config, not this run: train it afresh in a run that replaces it
        log.warning("trainer.resume: run %s (%s) left no checkpoint: training afresh in a new run", run_id, status)
        return None, None, [run_id]
    if status == "RUNNING":  # its process is gone (the lock was free): the run must not show as running for ever
        tracking.supersede(cfg.tracking, [run_id], client=client)
    raise TrainingError(
        f"run {run_id} ({status}) has no complete checkpoint at {folder}: it cannot be resumed. Start a new run."
    )


def same_run(cfg: DictConfig, fingerprint: str, data_digest: str, described: dict[str, Any]) -> str | None:
    """What keeps a run from resuming with this config, or None: a resumed run trains on as it started, with its
    config, seed, cell code and data; anything else would leave a record that contradicts itself (the params of one
    config, the epochs of another). A key the run has no param for is newer than it: it ran with the default."""
    tags, params = described.get("tags", {}), described.get("params", {})
    if tags.get("data_digest", data_digest) != data_digest:
        return f"trained on other prepared data (data_digest {tags['data_digest'][:12]}, now {data_digest[:12]})"
    if tags.get("config_hash", fingerprint) == fingerprint:
        return None
    now = tracking.flatten(config.result_config(cfg))
    differ = [f"{k}={params[k]} (now {now[k]})" for k in sorted(now) if k in params and str(now[k]) != params[k]]
    if "cell_code" in tags and tags["cell_code"] != cells.code_digest(cfg.model.cell):
        differ.append(f"the code of {cfg.model.cell}")
    return f"started with other settings: {', '.join(differ)}" if differ else None


def lock_run(cfg: DictConfig, run_id: str) -> tracking.RunLock:
    """Hold ``run_id``'s lock from now on, or refuse: a live process is training it."""
    lock = tracking.RunLock(cfg.paths.checkpoints, run_id)
    try:
        return lock.acquire()
    except BlockingIOError:
        raise TrainingError(
            f"run {run_id} is being trained right now ({lock.holder() or 'by another process'}): it is busy, not "
            "interrupted. Wait for it to end, or stop that process (Ctrl-C or `kill <pid>`: the run ends KILLED "
            "with its checkpoint), then resume it."
        ) from None


def earlier_attempt(
    cfg: DictConfig, job_id: str, client: Any = None
) -> tuple[dict[str, Any] | None, str | None, list[str]]:
    """A sweep job that ran before in this sweep (same config_id and seed, or the same search trial, e.g. a resumed
    sweep): its result when a run of it FINISHED (the job is skipped); else the newest run to resume when its
    checkpoint survived; else (None, None, ...) to start afresh. The third item: the job's earlier runs that the
    run about to train replaces (their process is gone, a kill -9 may have left them RUNNING). ``job_id``: the
    run's ``config_id``; ``client``: the run's connection to its store."""
    parent = tracking.sweep_parent()
    if not parent or not cfg.tracking.enabled or cfg.trainer.resume_run_id or cfg.trainer.resume:
        return None, None, []
    if cfg.search.trial is not None:  # a trial is itself, whatever another trial with the same values did
        job = f"{cfg.search.study} trial {cfg.search.trial}"
        attempts = tracking.sweep_attempts(cfg, parent, {"study": cfg.search.study, "trial": cfg.search.trial}, client)
    else:
        job = job_id
        attempts = tracking.sweep_attempts(cfg, parent, {"config_id": job, "seed": cfg.seed}, client)
    finished = [r for r in attempts if r.info.status == "FINISHED"]
    if finished:
        return skipped(cfg, finished[0], job), None, []
    if not attempts:
        return None, None, []
    stale = [r.info.run_id for r in attempts if "superseded_by" not in r.data.tags]
    newest = attempts[0]
    run_id = newest.info.run_id
    if Checkpoint(Path(cfg.paths.checkpoints) / run_id).exists():
        log.info("resuming this job's %s run %s from its checkpoint", newest.info.status, run_id)
        return None, run_id, [r for r in stale if r != run_id]
    for attempt in attempts:  # refused if a live process still trains one: never replace a run under it
        if attempt.info.status == "RUNNING":
            lock_run(cfg, attempt.info.run_id).release()
    log.info("this job's %s run %s left no checkpoint: training it afresh in a new run", newest.info.status, run_id)
    return None, None, stale


def skipped(cfg: DictConfig, run, job: str) -> dict[str, Any]:
    """The result of a job that a FINISHED run of this sweep already holds: read back, not trained again."""
    run_id = run.info.run_id
    log.info("skipped: this sweep FINISHED this job (%s, seed %s) as run %s", job, cfg.seed, run_id)
    metrics = dict(run.data.metrics)
    objective = of_metrics(metrics)
    best = objective.best(tracking.metric_histories(cfg.tracking.uri, [run_id], [objective.val])["value"])
    pruned = run.data.tags.get("trial_state") == "PRUNED"
    return {"metrics": metrics, "run_id": run_id, "skipped": True, "pruned": pruned, "best": best}


def load_dataset(cfg: DictConfig) -> data.Dataset:
    """The prepared dataset, read and verified once: its meta, digest (the data version) and arrays serve the whole
    run. ``data.*`` given at train time must be what it was prepared with."""
    dataset = data.load(cfg.paths.data, cfg.data.name)
    if "config" in dataset.meta:
        config.check_prepared(cfg.data, dataset.meta["config"])
    return dataset


@dataclass
class Start:
    """Where a run starts, decided before anything is built: a finished sweep job's result (``done``: nothing to
    train), or the run to resume (its lock held) or none, and the dead runs the new one replaces."""

    fingerprint: str
    job_id: str
    done: dict[str, Any] | None = None
    resume_run_id: str | None = None
    lock: tracking.RunLock | None = None
    superseded: list[str] = field(default_factory=list)


def where_to_start(cfg: DictConfig, dataset: data.Dataset, client: Any) -> Start:
    """A sweep job that ran before (``earlier_attempt``), else ``trainer.resume``/``resume_run_id``
    (``resume_target``): refused resumes are refused here, before the store is touched."""
    precision = models.resolve_precision(cfg.trainer.precision, dataset.meta["kind"])
    start = Start(config.fingerprint(cfg), config.config_id(cfg, dataset.digest, precision))
    start.done, earlier, start.superseded = earlier_attempt(cfg, start.job_id, client)
    if start.done:
        return start
    if earlier:
        with open_dict(cfg):
            cfg.trainer.resume_run_id = earlier
    start.resume_run_id, start.lock, replaced = resume_target(cfg, start.fingerprint, dataset.digest, client)
    start.superseded += replaced
    return start


def run_tags(cfg: DictConfig, task: tasks.Task, start: Start, trial: sweep.TrialLink | None) -> dict[str, Any]:
    """What the run is (``tracking.run_tags``), which loops trained it, and its search trial if any."""
    params = task.model.count_params()
    tags = tracking.run_tags(cfg, start.fingerprint, start.job_id, task.dataset.digest, params, task.precision)
    tags["kernels"] = task.kernels_tag  # fused or Keras' loops (trainer.kernels as resolved here)
    baseline = task.dataset.meta.get("baseline")  # what a model without memory scores (the report shows it)
    if baseline:
        tags.update({f"baseline.{key}": value for key, value in baseline.items()})
    if trial:
        tags.update(study=cfg.search.study, trial=trial.number)
    return tags


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate on the test split, track everything; return the final metrics and the run id.

    The happy path: validate, read the data, connect to the store (once), decide where to start, train, finish.
    The exceptional paths are beside it: a pruned search trial, an interrupt (the run ends KILLED and can resume),
    an error (the run ends FAILED with it)."""
    config.validate(cfg)
    dataset = load_dataset(cfg)
    size_to_budget(cfg, dataset.meta)
    client = tracking.connect(cfg.tracking) if cfg.tracking.enabled else None  # this run's one connection
    start = where_to_start(cfg, dataset, client)
    if start.done:
        return start.done
    resume_run_id, lock = start.resume_run_id, start.lock
    interrupts = tracking.Interrupts()
    history: list[dict[str, float]] = []
    run_id = resume_run_id
    try:
        tasks.setup_runtime(cfg)
        task = tasks.make(cfg, dataset)
        task.hold = interrupts.held
        trial = None if cfg.search.trial is None else sweep.TrialLink(cfg.search, cfg.tracking.uri, cfg.trainer.epochs)
        tracked = tracking.start_run(cfg, run_tags(cfg, task, start, trial), resume_run_id, interrupts, client)
        with sigterm_as_interrupt(interrupts), tracked as tracker:
            run_id = tracker.run_id
            tracking.supersede(cfg.tracking, start.superseded, run_id, client)  # the runs replaced end, pointing here
            if not resume_run_id:
                tracker.log_dataset(cfg.data.name, data.prepared_dir(cfg.paths.data, cfg.data.name), dataset.splits)
            if lock is None and run_id:
                lock = tracking.RunLock(cfg.paths.checkpoints, run_id).acquire()
            checkpoint = Checkpoint(Path(cfg.paths.checkpoints) / (run_id or f"untracked-{start.fingerprint}"))
            history = task.restore(checkpoint, tracker) if resume_run_id else []
            train_epochs(cfg, task, tracker, checkpoint, history, trial)
            final, exported, model_uri = finish(cfg, task, tracker, history)
            if trial:
                tracker.set_tags({"trial_state": "COMPLETE"})
    except sweep.Pruned as err:
        log.info("trial %s of %r: %s", cfg.search.trial, cfg.search.study, err)
        shutil.rmtree(checkpoint.folder, ignore_errors=True)
        return {"metrics": history[-1], "history": history, "run_id": run_id, "pruned": True}
    except KeyboardInterrupt as err:
        raise Interrupted(run_id, len(history), interrupts.signal, interrupts.unmarked) from err
    except Exception as err:
        if interrupts.requested:  # SIGTERM landed inside TensorFlow, which turned it into an error of its own
            raise Interrupted(run_id, len(history), interrupts.signal, interrupts.unmarked) from err
        if isinstance(err, CheckpointError):
            raise err.with_resume(run_id) from err
        raise
    finally:
        if lock is not None:
            lock.release()
    shutil.rmtree(checkpoint.folder, ignore_errors=True)  # finished: the model is in MLflow
    return export(cfg, final, history, exported, run_id, model_uri)


def train_epochs(
    cfg: DictConfig,
    task: tasks.Task,
    tracker: tracking.Tracker,
    checkpoint: Checkpoint,
    history: list[dict],
    trial: sweep.TrialLink | None = None,
) -> None:
    """The epoch loop, from the first epoch not in ``history``: train, validate, checkpoint, log, report to a search
    trial (which may prune it), early stop."""
    best = min((h["val/loss"] for h in history), default=math.inf)
    waited = 0
    epochs = cfg.trainer.epochs
    for epoch in range(len(history), epochs):
        metrics = task.fit_epoch(epoch)
        history.append(metrics)
        if cfg.trainer.checkpoint:  # first, so the epoch survives a tracking store that fails just now
            checkpoint.save(task.model, epoch, history)
        try:
            tracker.log_metrics(metrics, step=epoch)
            for path, text in task.epoch_texts(epoch).items():
                tracker.log_text(text, path)
        except tracking.TrackingError as err:
            kept = (
                f"epoch {epoch + 1} is checkpointed at {checkpoint.folder}"
                if cfg.trainer.checkpoint
                else "nothing was checkpointed (trainer.checkpoint=false)"
            )
            raise tracking.TrackingError(
                f"{err}\nTraining stopped: {kept}. When the store answers again, continue with "
                f"trainer.resume_run_id={tracker.run_id}"
            ) from err
        log.info("epoch %d/%d: %s", epoch + 1, epochs, {k: round(v, 4) for k, v in metrics.items()})
        if trial:
            trial.report(epoch, metrics)
        best, waited = (metrics["val/loss"], 0) if metrics["val/loss"] < best else (best, waited + 1)
        if cfg.trainer.early_stopping_patience and waited >= cfg.trainer.early_stopping_patience:
            log.info("early stop: val/loss has not improved for %d epochs", waited)
            break


def finish(cfg: DictConfig, task: tasks.Task, tracker: tracking.Tracker, history: list[dict]) -> tuple:
    """Evaluate on the test split and log the final metrics and the model; return (metrics, model, model URI)."""
    final = {**task.evaluate("test"), "epochs": len(history)}
    tasks.check_finite(final, f"the test evaluation after {len(history)} epochs")
    tracker.log_metrics(final, step=len(history))
    exported = task.export_model()
    model_uri = None
    if cfg.tracking.log_model:
        vocab_file = data.prepared_dir(cfg.paths.data, cfg.data.name) / "vocab.txt"
        extra = [str(vocab_file)] if task.dataset.vocab is not None else []
        model_uri = tracker.log_model(exported, task.example(), extra_files=extra)
    return final, exported, model_uri


def export(cfg: DictConfig, final: dict, history: list[dict], model: keras.Model, run_id, model_uri) -> dict:
    """The pipeline's outputs (DVC) with ``export=true``; a manual run leaves them alone. Returns the result."""
    last = history[-1] if history else {}
    report = {**final, **{k: v for k, v in last.items() if k.startswith(("train/", "val/"))}}
    if cfg.export:
        save_model_atomic(model, Path(cfg.paths.models) / f"{cfg.data.name}.keras")
        data.write_json(Path(cfg.paths.reports) / "metrics" / f"{cfg.data.name}.json", report)
    log.info("test metrics: %s", {k: round(v, 4) for k, v in final.items()})
    return {"metrics": report, "history": history, "run_id": run_id, "model_uri": model_uri, "model": model}


def parallel_job_threads(cfg: DictConfig) -> None:
    """Jobs of the joblib launcher share the machine: unless threads were set, give each one TF thread per pool
    (two one-thread jobs beat two default-thread jobs on 2 cores, see STACK.md)."""
    hydra_cfg = HydraConfig.get()
    if "joblib" in str(hydra_cfg.launcher.get("_target_", "")).lower():
        with open_dict(cfg):
            cfg.trainer.intra_op_threads = cfg.trainer.intra_op_threads or 1
            cfg.trainer.inter_op_threads = cfg.trainer.inter_op_threads or 1


def resume_command(run_id: str) -> str:
    """The command line that continues ``run_id``: this one's overrides, without resume switches (redacted)."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("trainer.resume")]
    return " ".join(
        ["python -m pipeline.train", *map(shlex.quote, map(redact, overrides)), f"trainer.resume_run_id={run_id}"]
    )


def interrupted_message(err: Interrupted) -> str:
    how = "Ctrl-C" if err.signum in (None, signal.SIGINT) else signal.Signals(err.signum).name
    if not err.run_id:
        return f"interrupted ({how}) before the run started: nothing to resume"
    kept = f"its checkpoint after epoch {err.epochs_done} is kept" if err.epochs_done else "no epoch had finished"
    status = "could not be marked KILLED (the store failed; the resume ends it)" if err.unmarked else "is KILLED"
    return f"interrupted ({how}): run {err.run_id} {status}, {kept}. Continue it with: {resume_command(err.run_id)}"


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | str:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    parallel_job_threads(cfg)
    try:
        result = run(cfg)
    except Interrupted as err:
        log.error("%s", interrupted_message(err))
        if multirun:
            raise  # the whole sweep stops
        raise SystemExit(128 + (err.signum or signal.SIGINT)) from None
    except USER_ERRORS as err:
        log.error("%s", err)
        if multirun:  # one failed job (its run is FAILED in MLflow) must not stop the rest of the sweep
            return float("nan")
        raise SystemExit(1) from None
    except Exception:
        if multirun:  # an unexpected error: its run is FAILED with the error, the sweep goes on and exits 1
            log.exception("job failed")
            return float("nan")
        raise
    return objective(result)


def objective(result: dict[str, Any]) -> float | str:
    """What a sweeper optimises: the best epoch's validation metric (``PRUNED`` for a pruned trial)."""
    if result.get("pruned"):
        return sweep.PRUNED
    if "best" in result:  # a skipped job: its finished run's best epoch
        return result["best"]
    return sweep.best_objective(result["history"])


def cli() -> None:
    """``python -m pipeline.train``: Hydra's app, plus the truth about a sweep that stopped early (its parent run
    ends KILLED or FAILED, the exit code is non-zero) and one line instead of a traceback on an interrupt."""
    # Presets, sweeps and budgets are config groups (experiment=ptb_small); the older +experiment= form still works.
    sys.argv = [arg[1:] if arg.startswith(PRESET_GROUPS) else arg for arg in sys.argv]
    try:
        sys.argv = [sys.argv[0], *sweep.expand_seeds(sys.argv[1:])]
    except sweep.SweepError as err:
        sys.exit(f"error: {err}")
    interrupts = tracking.Interrupts()
    with sigterm_as_interrupt(interrupts):  # a sweep's own process: launchers' workers are stopped on the way out
        try:
            main()
            # At exit Python's garbage-collection passes walked every object of the traced TensorFlow graphs: 1.7 s of
            # each run (2-core EPYC). Frozen, they are left to the OS; the exit handlers (logging's flush, MLflow's)
            # still run. Only after a clean finish: a stopped run's live input threads are torn down as usual.
            gc.freeze()
        except KeyboardInterrupt as err:
            if stuck := sweep.stuck_reason():  # the SLURM watch cancelled jobs that could never start
                log.error("sweep FAILED: %s", stuck)
                tracking.abandon_sweep(interrupted=False)
                sys.exit(1)
            sweep.cancel_cluster_jobs()
            tracking.abandon_sweep(interrupted=True)
            signum = getattr(err, "signum", None) or interrupts.signal or signal.SIGINT
            sys.exit(128 + signum)
        except BaseException:
            sweep.cancel_cluster_jobs()  # e.g. one SLURM job timed out: the others would train on, unseen
            tracking.abandon_sweep(interrupted=False)
            raise


if __name__ == "__main__":
    cli()
