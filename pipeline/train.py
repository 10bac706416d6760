"""Training stage: train the configured model on a prepared dataset and track it in MLflow.

python -m pipeline.train                                 # toy task, LSTM, default budget
python -m pipeline.train +experiment=ptb_small           # a named preset
python -m pipeline.train model=gru trainer=smoke         # any group option
python -m pipeline.train -m model=rnn,lstm,gru           # a Hydra multirun sweep
python -m pipeline.train +experiment=ptb_small trainer.resume=true   # continue an interrupted run
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import keras
import numpy as np
import tensorflow as tf
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from pipeline import config, data, models, tasks, tracking
from pipeline.generate import generate

log = logging.getLogger(__name__)

config.register()

SAMPLE_PRIME = "the company said"


TrainingError = tasks.TrainingError


def setup_runtime(cfg: DictConfig) -> None:
    """Seeds, determinism and thread counts, before any model is built."""
    keras.utils.set_random_seed(cfg.seed)
    if cfg.trainer.deterministic:
        tf.config.experimental.enable_op_determinism()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cfg.trainer.intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(cfg.trainer.inter_op_threads)
    except RuntimeError:  # TF already started in this process (tests, notebooks): keep its threads
        log.debug("TensorFlow already initialised; thread settings unchanged")


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler, `kill`) ends training like Ctrl-C: the run is marked KILLED, the checkpoint kept."""

    def handler(signum, frame):
        if tracking.note_interrupt():
            raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a parallel launcher): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def rng_states(model: keras.Model) -> list:
    """The dropout layers' random-generator states: Keras' model files do not restore them, so a resumed run
    would draw other dropout masks than the uninterrupted one."""
    return [v for v in model.non_trainable_variables if "seed_generator_state" in v.path]


class Checkpoint:
    """The last finished epoch of a run: the whole model with its optimizer state (``model.keras``), and the
    metrics so far with the random-generator states (``state.json``). Both are replaced atomically, so an
    interruption never leaves half of one."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.model_path = folder / "model.keras"
        self.state_path = folder / "state.json"

    def exists(self) -> bool:
        return self.model_path.exists() and self.state_path.exists()

    def save(self, model: keras.Model, epoch: int, history: list[dict[str, float]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / ".partial.keras"
        model.save(tmp)
        os.replace(tmp, self.model_path)
        rng = [np.asarray(v).tolist() for v in rng_states(model)]
        data.write_json(self.state_path, {"epochs_done": epoch + 1, "history": history, "rng": rng})

    def load(self) -> tuple[keras.Model, int, list[dict[str, float]]]:
        state = json.loads(self.state_path.read_text())
        model = keras.models.load_model(self.model_path)
        for variable, value in zip(rng_states(model), state["rng"], strict=True):
            variable.assign(value)
        return model, state["epochs_done"], state["history"]


def resume_target(cfg: DictConfig, fingerprint: str) -> str | None:
    """The run to continue: ``trainer.resume_run_id``, or with ``trainer.resume`` the newest unfinished run of the
    same config; None to start afresh."""
    if cfg.trainer.resume_run_id:
        return cfg.trainer.resume_run_id
    if not cfg.trainer.resume:
        return None
    if not cfg.tracking.enabled:
        raise config.ConfigError("trainer.resume: resuming finds the run in MLflow; set tracking.enabled=true")
    run_id = tracking.find_resumable(cfg, fingerprint)
    if run_id is None:
        log.warning("trainer.resume: no unfinished run with this config (hash %s); starting afresh", fingerprint)
    return run_id


def sample_text(task: tasks.Task, words: int, seed: int) -> str:
    """Greedy and sampled continuations of a fixed prime: a readable check of what the model has learnt."""
    model, vocab = task.export_model(), task.dataset.vocab
    greedy = generate(model, vocab, SAMPLE_PRIME, words, strategy="greedy")
    sampled = generate(model, vocab, SAMPLE_PRIME, words, strategy="sample", seed=seed)
    return f"greedy: {SAMPLE_PRIME} {' '.join(greedy)}\nsample: {SAMPLE_PRIME} {' '.join(sampled)}\n"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate on the test split, track everything; return the final metrics and the run id."""
    config.validate(cfg)
    setup_runtime(cfg)
    dataset = data.load(cfg.paths.data, cfg.data.name)
    task = tasks.make(cfg, dataset)
    fingerprint = config.fingerprint(cfg)
    resume_run_id = resume_target(cfg, fingerprint)
    commit, dirty = tracking.git_state(cfg.paths.root)
    tags = {
        "dataset": cfg.data.name,
        "cell": ("bi" if cfg.model.bidirectional else "") + cfg.model.cell,
        "git_commit": commit,
        "git_dirty": dirty,
        "data_digest": dataset.digest,
        "seed": cfg.seed,
        "config_hash": fingerprint,
        "params_count": task.model.count_params(),
        "precision": task.precision,
    }
    schedule = models.lr_schedule(cfg.optimizer)
    with sigterm_as_interrupt(), tracking.start_run(cfg, tags, resume_run_id) as tracker:
        checkpoint = Checkpoint(Path(cfg.paths.checkpoints) / (tracker.run_id or f"untracked-{fingerprint}"))
        start, history = 0, []
        if resume_run_id:
            if not checkpoint.exists():
                raise TrainingError(f"run {resume_run_id} has no checkpoint at {checkpoint.folder}: cannot resume it")
            task.model, start, history = checkpoint.load()
            tracker.set_tags({"resumed_at_epoch": start})
            tracker.log_missing(history, probe="train/loss")  # epochs checkpointed but never logged
            log.info("resuming run %s after epoch %d from %s", resume_run_id, start, checkpoint.folder)
        best, waited = min((h["val/loss"] for h in history), default=math.inf), 0
        epochs = min(cfg.trainer.epochs, cfg.trainer.max_epochs or cfg.trainer.epochs)
        for epoch in range(start, epochs):
            task.model.optimizer.learning_rate.assign(schedule(epoch))
            started = time.perf_counter()
            metrics = task.train_epoch(epoch, cfg.trainer.verbose)
            seconds = time.perf_counter() - started
            metrics.update(task.evaluate("val"))
            if not math.isfinite(metrics["val/loss"]):
                raise TrainingError(f"validation loss became {metrics['val/loss']} at epoch {epoch + 1}")
            x_train, _ = task.train_arrays(epoch)
            metrics["train/learning_rate"] = float(schedule(epoch))
            metrics["perf/epoch_seconds"] = seconds
            metrics[f"perf/{task.unit}_per_sec"] = task.units(x_train) / max(seconds, 1e-9)
            history.append(metrics)
            if cfg.trainer.checkpoint:  # first, so the epoch survives a tracking store that fails just now
                checkpoint.save(task.model, epoch, history)
            try:
                tracker.log_metrics(metrics, step=epoch)
                if isinstance(task, tasks.LanguageModel) and cfg.trainer.generate_words:
                    sample = sample_text(task, cfg.trainer.generate_words, epoch)
                    tracker.log_text(sample, f"samples/epoch_{epoch + 1:03d}.txt")
            except tracking.TrackingError as err:
                kept = (
                    f"epoch {epoch + 1} is checkpointed at {checkpoint.folder}"
                    if cfg.trainer.checkpoint
                    else ("nothing was checkpointed (trainer.checkpoint=false)")
                )
                raise tracking.TrackingError(
                    f"{err}\nTraining stopped: {kept}. When the store answers again, continue with "
                    f"trainer.resume_run_id={tracker.run_id}"
                ) from err
            log.info("epoch %d/%d: %s", epoch + 1, epochs, {k: round(v, 4) for k, v in metrics.items()})
            best, waited = (metrics["val/loss"], 0) if metrics["val/loss"] < best else (best, waited + 1)
            if cfg.trainer.early_stopping_patience and waited >= cfg.trainer.early_stopping_patience:
                log.info("early stop: val/loss has not improved for %d epochs", waited)
                break
        final = {**task.evaluate("test"), "epochs": len(history)}
        tracker.log_metrics(final, step=len(history))
        exported = task.export_model()
        model_uri = None
        if cfg.tracking.log_model:
            vocab_file = data.prepared_dir(cfg.paths.data, cfg.data.name) / "vocab.txt"
            extra = [str(vocab_file)] if dataset.vocab is not None else []
            model_uri = tracker.log_model(exported, task.example(), extra_files=extra)

    shutil.rmtree(checkpoint.folder, ignore_errors=True)  # finished: the model is in MLflow
    last = history[-1] if history else {}
    report = {**final, **{k: v for k, v in last.items() if k.startswith(("train/", "val/"))}}
    if cfg.export:  # the pipeline's outputs (DVC): a manual run leaves them alone
        model_path = Path(cfg.paths.models) / f"{cfg.data.name}.keras"
        model_path.parent.mkdir(parents=True, exist_ok=True)
        exported.save(model_path)
        data.write_json(Path(cfg.paths.reports) / "metrics" / f"{cfg.data.name}.json", report)
    log.info("test metrics: %s", {k: round(v, 4) for k, v in final.items()})
    return {"metrics": report, "history": history, "run_id": tracker.run_id, "model_uri": model_uri, "model": exported}


def parallel_job_threads(cfg: DictConfig) -> None:
    """Jobs of the joblib launcher share the machine: unless threads were set, give each one TF thread per pool
    (two one-thread jobs beat two default-thread jobs on 2 cores, see STACK.md)."""
    hydra_cfg = HydraConfig.get()
    if "joblib" in str(hydra_cfg.launcher.get("_target_", "")).lower():
        with open_dict(cfg):
            cfg.trainer.intra_op_threads = cfg.trainer.intra_op_threads or 1
            cfg.trainer.inter_op_threads = cfg.trainer.inter_op_threads or 1


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    parallel_job_threads(cfg)
    try:
        result = run(cfg)
    except (TrainingError, tracking.TrackingError, data.DataError, config.ConfigError) as err:
        log.error("%s", err)
        if multirun:  # one failed job (its run is FAILED in MLflow) must not stop the rest of the sweep
            return float("nan")
        raise SystemExit(1) from err
    objective = "val/perplexity" if "val/perplexity" in result["metrics"] else "val/accuracy"
    return result["metrics"].get(objective, float("nan"))  # the objective for sweepers


if __name__ == "__main__":
    main()
