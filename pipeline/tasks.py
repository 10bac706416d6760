"""What differs between training a classifier and a language model, behind one small interface.

A task owns the Keras model, feeds it one epoch at a time, evaluates a split and names the metrics. The loop in
``pipeline.train`` stays the same for every dataset.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import sys
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig
from tqdm import tqdm

from pipeline import cells, kernels, models, xla_cache
from pipeline.data import Dataset
from pipeline.sampling import Pick, continuations

log = logging.getLogger(__name__)


SAMPLE_PRIME = "the company said"  # the language model's sample text each epoch starts here
NO_AUTOTUNE = tf.data.Options()
NO_AUTOTUNE.autotune.enabled = False  # see Task.run_batches


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what to change."""


FIXES = "lower optimizer.learning_rate, set optimizer.clip_global_norm, or check the data for NaNs"


def check_finite(metrics: dict[str, float], when: str) -> None:
    """A metric that is NaN or infinite means the run diverged: stop it (FAILED), never finish it as if it worked."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        raise TrainingError(f"training diverged: {shown} at {when}: {FIXES}.")


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


def one_log_handler() -> None:
    """TensorFlow's logger has a handler of its own when it was imported before logging was set up, and passes its
    records on to the root's too (Hydra's, which masks credentials): each warning printed twice. The root's alone."""
    if logging.getLogger().handlers:
        tf_logger = logging.getLogger("tensorflow")
        for handler in list(tf_logger.handlers):
            tf_logger.removeHandler(handler)


def setup_runtime(cfg: DictConfig) -> None:
    """Seeds, determinism, thread counts, the compile cache and the log's handlers, before any model is built."""
    one_log_handler()
    keras.utils.set_random_seed(cfg.seed)
    xla_cache.enable(cfg.trainer.compile_cache)
    if cfg.trainer.deterministic:
        tf.config.experimental.enable_op_determinism()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cfg.trainer.intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(cfg.trainer.inter_op_threads)
    except RuntimeError:  # TF already started in this process (tests, notebooks): keep its threads
        log.debug("TensorFlow already initialised; thread settings unchanged")


class Task:
    """Base: a compiled model plus its data. Subclasses set ``unit`` (what throughput counts) and the data."""

    unit = "samples"

    def __init__(self, cfg: DictConfig, dataset: Dataset, build: bool = True):
        self.cfg = cfg
        self.dataset = dataset
        # Around each call into the compiled step: a stop (Ctrl-C, SIGTERM) waits for the call to return, never
        # cutting TensorFlow's own Python machinery in half (train.run sets the run's Interrupts.held).
        self.hold: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.batch_size = cfg.trainer.batch_size
        self.precision = models.resolve_precision(cfg.trainer.precision, dataset.meta["kind"])
        # The fused kernels are the language model's: on MNIST (batch 128, 128 units, 28 steps) they measured 40%
        # slower than Keras' loop, and masked input (IMDB, toy) needs Keras' loop.
        lm = dataset.meta["kind"] == "language_model"
        self.kernels = models.resolve_kernels(cfg.trainer.kernels) if lm else "keras"
        self.scope = distribution_scope(cfg)
        self.model: keras.Model | None = None  # build=False: the data, batches and settings alone (a baseline's)
        if build:
            with self.scope:
                self.model = self.build()

    @property
    def kernels_tag(self) -> str:
        """Which loops trained the run: a cell without a fused kernel runs Keras' loop inside the fused path (the
        fused loss and optimizer still apply)."""
        cell = self.cfg.model.cell
        if self.kernels == "fused" and cells.get(cell).fused is None:
            return f"fused, Keras' loop for {cell} (it has no fused kernel)"
        layers = self.model.layers if self.model is not None else []
        if any(isinstance(layer, kernels.FusedLSTMStack) for layer in layers):
            return "fused, the LSTM layers as one wavefront"
        return self.kernels

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
            optimizer=models.build_optimizer(self.cfg.optimizer, fused=self.kernels == "fused"),
            loss=loss,
            metrics=metrics,
            jit_compile=self.cfg.trainer.jit_compile,
            steps_per_execution=self.cfg.trainer.steps_per_execution,
        )
        return model

    def cap(self, x: np.ndarray, y: np.ndarray, batches: int | None) -> tuple[np.ndarray, np.ndarray]:
        if batches:
            n = batches * self.batch_size
            return x[:n], y[:n]
        return x, y

    def run_batches(self, training: bool, x: np.ndarray, y: np.ndarray, epoch: int = 0, verbose: int = 0) -> dict:
        """Feed (x, y) batch by batch, in order, through Keras' compiled train (or test) step: the steps ``fit`` and
        ``evaluate`` take, without their per-call set-up. Returns the mean loss and metrics over the batches.

        Measured choices (see README, Speed): ``trainer.steps_per_execution`` steps run per call, so Python only
        runs between groups of steps. The full batches come first, with their batch size fixed in the graph (an
        unknown batch size made the masked IMDB LSTM 15% slower); a last short batch gets its own graph, traced
        once. Autotuning is off: deleting a tf.data iterator waits for its autotuning thread to wake up, which
        stalled 2-5 s at random at the end of ``fit`` (and of each epoch); a fixed prefetch never stalls.
        """
        model = self.model
        if training:
            model.make_train_function()
            step = model.train_function
        else:
            model.make_test_function()
            step = model.test_function
        progress = self.progress_bar(math.ceil(len(x) / self.batch_size), epoch, verbose)
        full = len(x) // self.batch_size * self.batch_size
        done = 0
        model.reset_metrics()
        with progress:  # closed (and cleared) even when the divergence guard stops the epoch
            for part in (slice(0, full), slice(full, len(x))):
                size = min(self.batch_size, part.stop - part.start)  # the short batch is a batch of its own size
                if size == 0:
                    continue
                end = done + (part.stop - part.start) // size  # batch count once this part is through
                dataset = tf.data.Dataset.from_tensor_slices((x[part], y[part])).batch(size, drop_remainder=True)
                dataset = dataset.prefetch(2).with_options(NO_AUTOTUNE)
                iterator = iter(model.distribute_strategy.experimental_distribute_dataset(dataset))
                while done < end:
                    with self.hold():
                        logs = step(iterator)
                    first, done = done + 1, min(done + model.steps_per_execution, end)
                    loss = float(logs["loss"])
                    if training:
                        batch = f"batch {done}" if first == done else f"batches {first}-{done}"
                        self.check_loss(loss, f"epoch {epoch + 1}, {batch}")
                    self.show_progress(progress, done, loss)
        return {k: float(v) for k, v in model.get_metrics_result().items()}

    def progress_bar(self, batches: int, epoch: int, verbose: int) -> tqdm:
        """``trainer.verbose`` 1: a progress bar over the epoch's batches, on stderr, when stderr is a terminal and
        this is not a parallel sweep's worker (their bars would overwrite each other). Otherwise a disabled bar that
        prints nothing: DVC, CI and log files get only the one line per epoch that ``pipeline.train`` logs."""
        terminal = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        show = verbose == 1 and terminal and multiprocessing.parent_process() is None
        desc = f"epoch {epoch + 1}/{self.cfg.trainer.epochs}"
        return tqdm(total=batches, desc=desc, unit="batch", leave=False, file=sys.stderr, disable=not show)

    def show_progress(self, progress: tqdm, done: int, loss: float) -> None:
        """Move the bar to ``done`` batches, with the running loss as the epoch line names it (per token, and the
        perplexity, for a language model). Once per ``steps_per_execution`` call; tqdm redraws at most 10 times a
        second."""
        if progress.disable:
            return
        shown = {name.split("/")[-1]: f"{value:.4g}" for name, value in self.metrics("", {"loss": loss}).items()}
        progress.set_postfix(shown, refresh=False)
        progress.update(done - progress.n)

    def chance_loss(self) -> float:
        """The loss of a model that knows nothing (uniform over the classes): where training starts, and the
        divergence guard's reference."""
        return math.log(self.dataset.meta["num_classes"])

    def check_loss(self, loss: float, where: str) -> None:
        """Stop on a NaN or infinite loss, or one ``trainer.divergence_factor`` times the chance-level loss."""
        if not math.isfinite(loss):
            raise TrainingError(f"loss became {loss} at {where}: {FIXES}.")
        factor, chance = self.cfg.trainer.divergence_factor, self.chance_loss()
        if factor and loss > factor * chance:
            raise TrainingError(
                f"training diverged: loss {loss:.4g} at {where} is over {factor:g} times the loss of guessing "
                f"({chance:.4g}): {FIXES} (trainer.divergence_factor sets the limit; null turns it off)."
            )

    def fit_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch and validate: the epoch's metrics, learning rate and throughput, all finite."""
        schedule = models.lr_schedule(self.cfg.optimizer)
        self.model.optimizer.learning_rate.assign(schedule(epoch))
        started = time.perf_counter()
        metrics = self.train_epoch(epoch, self.cfg.trainer.verbose)
        seconds = time.perf_counter() - started
        metrics.update(self.evaluate("val"))
        check_finite(metrics, f"epoch {epoch + 1}")
        metrics["train/learning_rate"] = float(schedule(epoch))
        metrics["perf/epoch_seconds"] = seconds
        metrics[f"perf/{self.unit}_per_sec"] = self.units(self.train_arrays(epoch)[0]) / max(seconds, 1e-9)
        return metrics

    def epoch_texts(self, epoch: int) -> dict[str, str]:
        """Text artifacts to log after an epoch, by path (none for a classifier)."""
        return {}

    def restore(self, checkpoint: Any, tracker: Any) -> list[dict[str, float]]:
        """Continue from a checkpoint: its model (with optimizer and dropout states) replaces ours; the epochs it
        holds that never reached the store are logged now. Returns the history so far."""
        self.model, start, history = checkpoint.load()
        tracker.set_tags({"resumed_at_epoch": start})
        tracker.log_missing(history, probe="train/loss")
        log.info("resuming run %s after epoch %d from %s", tracker.run_id, start, checkpoint.folder)
        return history

    def train_epoch(self, epoch: int, verbose: int = 0) -> dict[str, float]:
        """One pass over the training data, in this epoch's (seeded) order; returns the epoch's train metrics."""
        x, y = self.train_arrays(epoch)
        return self.metrics("train", self.run_batches(True, x, y, epoch, verbose))

    def evaluate(self, split: str) -> dict[str, float]:
        x, y = self.eval_arrays(split)
        return self.metrics(split, self.run_batches(False, x, y))


class Classification(Task):
    """One label per sequence; padded steps are masked by the model."""

    loss, compiled_metrics = "sparse_categorical_crossentropy", ("accuracy",)  # what Keras computes each step

    def build(self) -> keras.Model:
        model = models.build_classifier(self.cfg.model, self.dataset.meta, self.precision)
        return self.compile(model, self.loss, list(self.compiled_metrics))

    def train_arrays(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        split = self.dataset.splits["train"]
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(split["y"]))
        return self.cap(split["x"][order], split["y"][order], self.cfg.trainer.max_steps_per_epoch)

    def eval_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        s = self.dataset.splits[split]
        return self.cap(s["x"], s["y"], self.cfg.trainer.max_eval_batches)


class Regression(Classification):
    """One real value per sequence (the adding problem), judged by mean squared error."""

    loss, compiled_metrics = "mean_squared_error", ()

    def metrics(self, prefix: str, logs: dict[str, float]) -> dict[str, float]:
        loss = float(logs["loss"])
        return {f"{prefix}/loss": loss, f"{prefix}/mse": loss}

    def chance_loss(self) -> float:
        """An untrained model's output is near 0: its loss is the mean square of the targets."""
        return float(np.mean(np.square(self.dataset.splits["train"]["y"])))


class Tagging(Classification):
    """One label per step (the copy task): cross-entropy and accuracy averaged over every step (the model's head
    is per step; the loss is the classifier's)."""

    def metrics(self, prefix: str, logs: dict[str, float]) -> dict[str, float]:
        out = super().metrics(prefix, logs)
        out[f"{prefix}/cross_entropy"] = out[f"{prefix}/loss"]
        return out


class LanguageModel(Task):
    """Next-word prediction with truncated back-propagation through time: the state is carried from one window
    to the next within an epoch and reset between epochs and before every evaluation."""

    unit = "tokens"

    def __init__(self, cfg: DictConfig, dataset: Dataset, build: bool = True):
        self.steps = cfg.trainer.bptt_steps
        self.exported: keras.Model | None = None  # export_model's stateless copy, built at its first call
        super().__init__(cfg, dataset, build)
        self._windows = {
            split: lm_windows(s["ids"], self.batch_size, self.steps) for split, s in dataset.splits.items()
        }

    def build(self) -> keras.Model:
        fused = self.kernels == "fused"
        meta = self.dataset.meta
        wavefront = self.cfg.trainer.wavefront
        model = models.build_language_model(self.cfg.model, meta, self.batch_size, self.precision, fused, wavefront)
        return self.compile(model, models.SequenceLoss(self.steps, fused=fused), [])

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

    def chance_loss(self) -> float:
        return self.steps * math.log(self.dataset.meta["vocab_size"])  # the loss is summed over a window

    def train_epoch(self, epoch: int, verbose: int = 0) -> dict[str, float]:
        models.reset_states(self.model)
        try:
            return super().train_epoch(epoch, verbose)
        finally:
            models.reset_states(self.model)

    def evaluate(self, split: str) -> dict[str, float]:
        models.reset_states(self.model)
        try:
            return super().evaluate(split)
        finally:
            models.reset_states(self.model)

    def epoch_texts(self, epoch: int) -> dict[str, str]:
        """Greedy and sampled continuations of a fixed prime: a readable check of what the model has learnt."""
        words = self.cfg.trainer.generate_words
        if not words:
            return {}
        model, vocab = self.export_model(), self.dataset.vocab
        greedy, sampled = continuations(model, vocab, SAMPLE_PRIME, words, [Pick("greedy"), Pick("sample", seed=epoch)])
        text = f"greedy: {SAMPLE_PRIME} {' '.join(greedy)}\nsample: {SAMPLE_PRIME} {' '.join(sampled)}\n"
        return {f"samples/epoch_{epoch + 1:03d}.txt": text}

    def export_model(self) -> keras.Model:
        """A stateless copy with the trained weights: any batch, any length, starting from a zero state. Built once
        and given the current weights at every call, so that its traced sampling graph serves every epoch."""
        if self.exported is None:
            self.exported = models.build_language_model(self.cfg.model, self.dataset.meta, precision=self.precision)
        self.exported.set_weights(self.model.get_weights())
        return self.exported

    def example(self) -> np.ndarray:
        return self.dataset.splits["test"]["ids"][: 2 * self.steps].reshape(2, self.steps)


def make(cfg: DictConfig, dataset: Dataset, build: bool = True) -> Task:
    """The task for the dataset's kind; ``build=False`` leaves out the model (a baseline that builds its own)."""
    kind = dataset.meta["kind"]
    if kind not in TASKS:
        raise ValueError(f"no task for data kind {kind!r}")
    return TASKS[kind](cfg, dataset, build)


TASKS = {  # a dataset's kind -> how it trains
    "classification": Classification,
    "regression": Regression,
    "tagging": Tagging,
    "language_model": LanguageModel,
}
