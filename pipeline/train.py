"""Training stage: train the configured model on a prepared dataset and track it in MLflow.

python -m pipeline.train                          # toy task, LSTM, default budget
python -m pipeline.train model=gru trainer=smoke  # any group option
python -m pipeline.train -m model=rnn,lstm,gru    # a Hydra multirun sweep
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
import keras
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig

from pipeline import config, data, models, tracking

log = logging.getLogger(__name__)

config.register()


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what to change."""


class StopOnNonFinite(keras.callbacks.Callback):
    """Stop at the first NaN or infinite loss instead of training on garbage."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True
            raise TrainingError(
                f"loss became {float(loss)} at epoch {self.epoch + 1}, batch {batch + 1}: lower "
                "optimizer.learning_rate, set optimizer.clip_global_norm, or check the data for NaNs."
            )


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


def training_split(split: dict[str, np.ndarray], cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) to fit on, cut to ``max_steps_per_epoch`` batches for a smoke budget."""
    x, y = split["x"], split["y"]
    if cfg.trainer.max_steps_per_epoch:
        n = cfg.trainer.max_steps_per_epoch * cfg.trainer.batch_size
        x, y = x[:n], y[:n]
    return x, y


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate on the test split, track everything; return the final metrics and the run id."""
    config.validate(cfg)
    setup_runtime(cfg)
    prepared = data.load(cfg.paths.data, cfg.data.name)
    splits = prepared.splits
    x_train, y_train = training_split(splits["train"], cfg)

    model = models.build_model(cfg.model, prepared.meta)
    model.compile(
        optimizer=models.build_optimizer(cfg.optimizer),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    commit, dirty = tracking.git_state(cfg.paths.root)
    tags = {
        "dataset": cfg.data.name,
        "cell": ("bi" if cfg.model.bidirectional else "") + cfg.model.cell,
        "git_commit": commit,
        "git_dirty": dirty,
        "data_digest": prepared.digest,
        "seed": cfg.seed,
        "params_count": model.count_params(),
    }
    with tracking.start_run(cfg, tags) as tracker:
        epoch_logger = tracking.EpochLogger(tracker, samples_per_epoch=len(x_train))
        callbacks = [
            StopOnNonFinite(),
            keras.callbacks.LearningRateScheduler(models.lr_schedule(cfg.optimizer)),
            epoch_logger,
        ]
        if cfg.trainer.early_stopping_patience:
            callbacks.append(
                keras.callbacks.EarlyStopping(patience=cfg.trainer.early_stopping_patience, restore_best_weights=True)
            )
        model.fit(
            x_train,
            y_train,
            validation_data=(splits["val"]["x"], splits["val"]["y"]),
            epochs=cfg.trainer.epochs,
            batch_size=cfg.trainer.batch_size,
            shuffle=True,
            callbacks=callbacks,
            verbose=cfg.trainer.verbose,
        )
        scores = model.evaluate(splits["test"]["x"], splits["test"]["y"], batch_size=256, verbose=0, return_dict=True)
        final = {f"test/{k}": float(v) for k, v in scores.items()}
        final["epochs"] = len(epoch_logger.history)
        tracker.log_metrics(final, step=final["epochs"])
        model_uri = tracker.log_model(model, splits["test"]["x"][:8]) if cfg.tracking.log_model else None

    model_path = Path(cfg.paths.models) / f"{cfg.data.name}.keras"
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model.save(model_path)
    last = epoch_logger.history[-1] if epoch_logger.history else {}
    report = {**final, **{k: v for k, v in last.items() if k.startswith(("train/", "val/"))}}
    data.write_json(Path(cfg.paths.reports) / "metrics" / f"{cfg.data.name}.json", report)
    log.info("test metrics: %s", {k: round(v, 4) for k, v in final.items()})
    return {"metrics": report, "run_id": tracker.run_id, "model_uri": model_uri, "model": model}


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    result = run(cfg)
    return result["metrics"].get("val/accuracy", float("nan"))  # the objective for sweepers


if __name__ == "__main__":
    main()
