"""What differs between training a classifier and a language model, behind one small interface.

A task owns the Keras model, feeds it one epoch at a time, evaluates a split and names the metrics. The loop in
``pipeline.train`` stays the same for every dataset.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig

from pipeline import models
from pipeline.data import Dataset

log = logging.getLogger(__name__)


def lm_windows(ids: np.ndarray, batch_size: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a token stream into ``batch_size`` parallel streams, then into windows of ``steps`` tokens.

    Returns (x, y) of shape (windows * batch_size, steps), window-major: rows ``[i*B:(i+1)*B]`` are window ``i`` of
    every stream, so that fitting in order with batch size B hands stream j's windows to state row j one after
    another. y is x shifted by one token (the next word). As the TF tutorial's ``ptb_producer``.
    """
    stream_len = len(ids) // batch_size
    streams = np.asarray(ids[: batch_size * stream_len]).reshape(batch_size, stream_len)
    n_windows = (stream_len - 1) // steps
    if n_windows < 1:
        raise ValueError(f"{len(ids)} tokens are too few for {batch_size} streams of windows of {steps} steps")
    x = np.stack([streams[:, i * steps : (i + 1) * steps] for i in range(n_windows)])
    y = np.stack([streams[:, i * steps + 1 : (i + 1) * steps + 1] for i in range(n_windows)])
    return x.reshape(-1, steps), y.reshape(-1, steps)


def distribution_scope(cfg: DictConfig):
    """``trainer.distribute``: build the model under ``tf.distribute.MirroredStrategy`` when more than one GPU is
    visible (weights mirrored, each batch split across the GPUs, gradients summed); otherwise nothing changes."""
    gpus = tf.config.list_logical_devices("GPU")
    if not cfg.trainer.distribute or len(gpus) < 2:
        if cfg.trainer.distribute:
            log.info("trainer.distribute: %d GPU(s) visible, training on one device", len(gpus))
        return contextlib.nullcontext()
    log.info("trainer.distribute: mirroring over %d GPUs (global batch %d)", len(gpus), cfg.trainer.batch_size)
    return tf.distribute.MirroredStrategy().scope()


class Task:
    """Base: a compiled model plus its data. Subclasses set ``unit`` (what throughput counts) and the data."""

    unit = "samples"

    def __init__(self, cfg: DictConfig, dataset: Dataset):
        self.cfg = cfg
        self.dataset = dataset
        self.batch_size = cfg.trainer.batch_size
        self.scope = distribution_scope(cfg)
        with self.scope:
            self.model = self.build()

    # --- hooks -------------------------------------------------------------------------------------------------
    def build(self) -> keras.Model:
        raise NotImplementedError

    def train_arrays(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def eval_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def metrics(self, prefix: str, logs: dict[str, float]) -> dict[str, float]:
        """Keras' logs (``loss``, ``accuracy``) as our metric names (``val/loss``, ``val/accuracy``)."""
        return {f"{prefix}/{k}": float(v) for k, v in logs.items()}

    def units(self, x: np.ndarray) -> int:
        """How many samples (or tokens) an epoch over ``x`` processes."""
        return len(x)

    def export_model(self) -> keras.Model:
        """The model to log and serve (the training model itself unless it is tied to a batch size)."""
        return self.model

    def example(self) -> np.ndarray:
        """A few inputs for MLflow's signature."""
        return self.eval_arrays("test")[0][:8]

    # --- shared ------------------------------------------------------------------------------------------------
    def compile(self, model: keras.Model, loss: Any, metrics: list[str]) -> keras.Model:
        model.compile(
            optimizer=models.build_optimizer(self.cfg.optimizer),
            loss=loss,
            metrics=metrics,
            jit_compile=self.cfg.trainer.jit_compile,
        )
        return model

    def cap(self, x: np.ndarray, y: np.ndarray, batches: int | None) -> tuple[np.ndarray, np.ndarray]:
        if batches:
            n = batches * self.batch_size
            return x[:n], y[:n]
        return x, y

    def train_epoch(self, epoch: int, callbacks: list, verbose: int) -> dict[str, float]:
        """One pass over the training data, in this epoch's (seeded) order; returns the epoch's train metrics."""
        x, y = self.train_arrays(epoch)
        history = self.model.fit(
            x, y, batch_size=self.batch_size, epochs=1, shuffle=False, callbacks=callbacks, verbose=verbose
        )
        return self.metrics("train", {k: v[-1] for k, v in history.history.items()})

    def evaluate(self, split: str) -> dict[str, float]:
        x, y = self.eval_arrays(split)
        logs = self.model.evaluate(x, y, batch_size=self.batch_size, verbose=0, return_dict=True)
        return self.metrics(split, logs)


class Classification(Task):
    """One label per sequence; padded steps are masked by the model."""

    def build(self) -> keras.Model:
        model = models.build_classifier(self.cfg.model, self.dataset.meta)
        return self.compile(model, "sparse_categorical_crossentropy", ["accuracy"])

    def train_arrays(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        split = self.dataset.splits["train"]
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(split["y"]))
        return self.cap(split["x"][order], split["y"][order], self.cfg.trainer.max_steps_per_epoch)

    def eval_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        s = self.dataset.splits[split]
        return self.cap(s["x"], s["y"], self.cfg.trainer.max_eval_batches)


class LanguageModel(Task):
    """Next-word prediction with truncated back-propagation through time: the state is carried from one window
    to the next within an epoch and reset between epochs and before every evaluation."""

    unit = "tokens"

    def __init__(self, cfg: DictConfig, dataset: Dataset):
        self.steps = cfg.trainer.bptt_steps
        super().__init__(cfg, dataset)
        self._windows = {
            split: lm_windows(s["ids"], self.batch_size, self.steps) for split, s in dataset.splits.items()
        }

    def build(self) -> keras.Model:
        model = models.build_language_model(self.cfg.model, self.dataset.meta, batch_size=self.batch_size)
        return self.compile(model, models.SequenceLoss(self.steps), [])

    def train_arrays(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = self._windows["train"]  # in order: the carried state needs consecutive windows
        return self.cap(x, y, self.cfg.trainer.max_steps_per_epoch)

    def eval_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = self._windows[split]
        return self.cap(x, y, self.cfg.trainer.max_eval_batches)

    def metrics(self, prefix: str, logs: dict[str, float]) -> dict[str, float]:
        loss = float(logs["loss"]) / self.steps  # mean cross-entropy per token
        perplexity = math.exp(loss) if loss < 700 else math.inf
        return {f"{prefix}/loss": loss, f"{prefix}/perplexity": perplexity}

    def units(self, x: np.ndarray) -> int:
        return int(x.size)

    def train_epoch(self, epoch: int, callbacks: list, verbose: int) -> dict[str, float]:
        models.reset_states(self.model)
        try:
            return super().train_epoch(epoch, callbacks, verbose)
        finally:
            models.reset_states(self.model)

    def evaluate(self, split: str) -> dict[str, float]:
        models.reset_states(self.model)
        try:
            return super().evaluate(split)
        finally:
            models.reset_states(self.model)

    def export_model(self) -> keras.Model:
        """A stateless copy with the trained weights: any batch, any length, starting from a zero state."""
        model = models.build_language_model(self.cfg.model, self.dataset.meta)
        model.set_weights(self.model.get_weights())
        return model

    def example(self) -> np.ndarray:
        return self.dataset.splits["test"]["ids"][: 2 * self.steps].reshape(2, self.steps)


def make(cfg: DictConfig, dataset: Dataset) -> Task:
    kind = dataset.meta["kind"]
    if kind == "classification":
        return Classification(cfg, dataset)
    if kind == "language_model":
        return LanguageModel(cfg, dataset)
    raise ValueError(f"no task for data kind {kind!r}")
