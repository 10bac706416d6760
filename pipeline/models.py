"""Model and optimizer factories: a Keras model from ``cfg.model`` plus what the prepared data says about inputs."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipeline import cells, kernels
from pipeline.config import OPTIMIZERS


@functools.cache
def gpu_available() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) below its first one with bfloat16 matmuls (AVX512_CORE_BF16).
ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@functools.cache
def cpu_flag_set(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The flags file's words, read once per file (None where it cannot be read: not Linux)."""
    try:
        return frozenset(Path(cpuinfo).read_text().split())
    except OSError:
        return None


def cpu_bf16_matmul(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's bfloat16 matrix instructions: ``amx_bf16`` (Intel Sapphire Rapids and later) or ``avx512_bf16``
    (AMD Zen 4 and later, Intel Cooper Lake), which oneDNN uses for bfloat16 matmuls; None = none (bfloat16 has no fast
    path then). ``cpuinfo``: the flags file (Linux's, unless a test hands another). ``ONEDNN_MAX_CPU_ISA`` caps what
    oneDNN dispatches to (``make bench``'s emulated AVX2 class sets it): an ISA below bfloat16 means None, as on a CPU
    without it, and ``AVX512_CORE_BF16`` leaves AMX out."""
    flags = cpu_flag_set(Path(cpuinfo))
    if flags is None:
        return None
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap in ISAS_WITHOUT_BF16:
        return None
    allowed = ("avx512_bf16",) if cap == "AVX512_CORE_BF16" else ("amx_bf16", "avx512_bf16")
    return next((flag for flag in allowed if flag in flags), None)


def resolve_precision(precision: str, kind: str = "language_model") -> str:
    """``trainer.precision`` decided for this machine and task kind. ``auto``: the output layer's gradients in
    bfloat16 on CPUs with bfloat16 instructions (the 10,000-way output layer is most of a PTB step), float32
    elsewhere. ``bfloat16_grad`` is for a language model's output layer: a classifier's few classes gain nothing from
    it, so a classifier trains in float32."""
    if precision == "auto":
        precision = "bfloat16_grad" if cpu_bf16_matmul() and not gpu_available() else "float32"
    if precision == "bfloat16_grad" and kind != "language_model":
        return "float32"
    return precision


@tf.custom_gradient
def matmul_bfloat16_grad(x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    """``x @ w`` in float32, whose two backward matmuls (into ``x`` and into ``w``) run in bfloat16: two thirds of an
    output layer's arithmetic, while the logits, the loss and the weights stay float32."""

    def grad(dy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.name_scope("bfloat16_grad"):  # named for pipeline.profile
            dy16 = tf.cast(dy, tf.bfloat16)
            dx = tf.matmul(dy16, tf.cast(w, tf.bfloat16), transpose_b=True)
            dw = tf.matmul(tf.cast(x, tf.bfloat16), dy16, transpose_a=True)
            return tf.cast(dx, x.dtype), tf.cast(dw, w.dtype)

    return tf.matmul(x, w), grad


@keras.saving.register_keras_serializable("rnnlab")
class Bfloat16GradDense(keras.layers.Dense):
    """A Dense layer (no activation) computed by ``matmul_bfloat16_grad``; its weights are a plain Dense layer's."""

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        shape = tf.shape(inputs)
        flat = tf.reshape(inputs, [-1, shape[-1]])
        y = matmul_bfloat16_grad(flat, tf.convert_to_tensor(self.kernel))
        if self.use_bias:
            y = y + self.bias
        return tf.reshape(y, tf.concat([shape[:-1], [self.units]], axis=0))


def layer_dtypes(precision: str) -> tuple[str | None, str | None]:
    """(body, output layer) Keras dtype policies for a resolved ``trainer.precision``; None = float32."""
    if precision == "bfloat16_output":
        return None, "mixed_bfloat16"
    if precision in ("mixed_bfloat16", "mixed_float16"):
        return precision, precision
    return None, None


def initializers(cfg: Any) -> dict[str, Any]:
    """Uniform in +-init_scale for every weight (Zaremba et al.), or Keras' defaults when init_scale is null."""
    if not cfg.get("init_scale"):
        return {}
    uniform = keras.initializers.RandomUniform(-cfg.init_scale, cfg.init_scale)
    return {"kernel_initializer": uniform, "recurrent_initializer": uniform, "bias_initializer": uniform}


def resolve_kernels(kernels: str) -> str:
    """``trainer.kernels`` decided for this machine: ``auto`` is ``fused`` on a CPU and ``keras`` on a GPU (where
    Keras' layers run cuDNN's kernels)."""
    if kernels == "auto":
        return "keras" if gpu_available() else "fused"
    return kernels


def recurrent_layer(
    cfg: Any,
    return_sequences: bool,
    name: str,
    stateful: bool = False,
    dtype: str | None = None,
    fused: bool = False,
    unroll: bool = True,
) -> keras.layers.Layer:
    """One recurrent layer of ``cfg.cell`` (see ``pipeline.cells``), bidirectional if asked. ``cfg.unroll`` is ignored
    on a GPU (an unrolled layer cannot use the cuDNN kernel) and where ``unroll`` is false. ``fused``: the layer
    trains with the cell's fused kernel (same weights) when it has one, else with Keras' loop."""
    cell = cells.get(cfg.cell)
    cls = (fused and cell.fused_class()) or cell.keras_class()
    settings = {"recurrent_dropout": cfg.recurrent_dropout, **initializers(cfg)}
    common = {
        "return_sequences": return_sequences,
        "stateful": stateful,
        "unroll": unroll and bool(cfg.get("unroll")) and not gpu_available(),
        "dtype": dtype,
        "name": name,
    }
    if isinstance(cls, type) and issubclass(cls, keras.layers.RNN):  # a whole layer: LSTM, GRU, their fused kernels
        layer = cls(cfg.units, **settings, **common)
    else:  # a cell (or a factory of one), which keras.layers.RNN runs over the sequence
        own = cells.cell_settings(cls, {**settings, "dtype": dtype}, cfg.cell)
        made = cls(cfg.units, **own)
        # A factory of a whole recurrent layer: made again with the layer's settings, not wrapped in a second one.
        layer = (
            cls(cfg.units, **{**own, **common})
            if isinstance(made, keras.layers.RNN)
            else keras.layers.RNN(made, **common)
        )
    if cfg.bidirectional:
        layer = keras.layers.Bidirectional(layer, name=f"bi_{name}", dtype=dtype)
    return layer


@keras.saving.register_keras_serializable("rnnlab")
class OneHot(keras.layers.Layer):
    """Symbol ids (batch, steps) -> one-hot vectors (batch, steps, ``depth``): no weights, nothing to learn."""

    def __init__(self, depth: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.depth = depth

    def call(self, ids):
        return keras.ops.one_hot(ids, self.depth, dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.depth)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "depth": self.depth}


def input_block(
    cfg: Any, meta: dict[str, Any], dtype: str | None = None
) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """Inputs and their masked representation: embedded tokens (id 0 = padding) or real-valued steps.

    The time axis is left open (None), so one model reads sequences padded to any length.
    """
    if meta["input"] == "tokens":
        if not cfg.embedding_dim:
            raise ValueError(f"dataset {meta['name']!r} has token inputs: set model.embedding_dim (e.g. 100)")
        inputs = keras.Input(shape=(None,), dtype="int32", name="tokens")
        # Embed each token id in an embedding_dim vector; id 0 is padding and is masked from here on.
        embedding = keras.layers.Embedding(
            meta["vocab_size"], cfg.embedding_dim, mask_zero=True, dtype=dtype, name="embedding"
        )
        x = embedding(inputs)
        return inputs, x
    if meta["input"] == "one_hot":  # symbol ids read as one-hot vectors, as the memory tasks' papers feed them
        inputs = keras.Input(shape=(None,), dtype="int32", name="symbols")
        return inputs, OneHot(meta["vocab_size"], dtype=dtype, name="one_hot")(inputs)
    inputs = keras.Input(shape=(None, meta["features"]), dtype="float32", name="steps")
    if meta.get("pad_value") is None:
        return inputs, inputs
    # Steps whose every feature equals pad_value are padding: the recurrent layers skip them.
    return inputs, keras.layers.Masking(mask_value=meta["pad_value"], name="mask")(inputs)


def build_classifier(cfg: Any, meta: dict[str, Any], precision: str = "float32") -> keras.Model:
    """Inputs -> ``layers`` stacked recurrent layers (each followed by dropout) -> the task's head.

    The head follows the dataset's kind: a softmax over the classes (``classification``), one linear output
    (``regression``), or a softmax over the classes at every step (``tagging``: the last layer returns its whole
    sequence). Otherwise the last recurrent layer returns its final *unpadded* state, so extra padding changes
    nothing.
    """
    body, head = layer_dtypes(precision)
    inputs, x = input_block(cfg, meta, body)
    per_step = meta["kind"] == "tagging"
    for i in range(cfg.layers):
        last = i == cfg.layers - 1
        x = recurrent_layer(
            cfg, return_sequences=per_step or not last, name=f"{cells.prefix(cfg.cell)}_{i + 1}", dtype=body
        )(x)
        if cfg.dropout:
            x = keras.layers.Dropout(cfg.dropout, name=f"dropout_{i + 1}", dtype=body)(x)
    outputs = output_head(x, meta, head)
    name = f"{'bi' if cfg.bidirectional else ''}{cells.prefix(cfg.cell)}_{meta['name']}"
    return keras.Model(inputs, outputs, name=name)


def output_head(x: keras.KerasTensor, meta: dict[str, Any], head: str | None) -> keras.KerasTensor:
    """A regression's one linear output, or class probabilities (per sequence or per step), in float32."""
    if meta["kind"] == "regression":
        return keras.layers.Dense(1, dtype="float32", name="value")(x)  # one weight vector: float32 always
    if head is None:
        return keras.layers.Dense(meta["num_classes"], activation="softmax", name="classes")(x)
    x = keras.layers.Dense(meta["num_classes"], name="class_logits", dtype=head)(x)  # reduced precision: logits
    return keras.layers.Activation("softmax", dtype="float32", name="classes")(x)  # ... the softmax in float32


def build_language_model(
    cfg: Any,
    meta: dict[str, Any],
    batch_size: int | None = None,
    precision: str = "float32",
    fused: bool = False,
    wavefront: bool = False,
) -> keras.Model:
    """Embedding -> dropout -> ``layers`` x (recurrent layer -> dropout) -> logits over the vocabulary, every step.

    With ``batch_size`` the recurrent layers are stateful: the state at the end of one window starts the next
    (truncated back-propagation through time), which needs a fixed batch. Without it the model reads whole
    sequences of any length and batch from a zero state: the form logged to MLflow and used for generation.
    ``bfloat16_grad`` changes only training, so only the stateful model uses ``Bfloat16GradDense``; ``fused``
    (``trainer.kernels``) likewise only trains the stateful model with ``pipeline.kernels``' recurrent layers, and
    ``wavefront`` (``trainer.wavefront``) runs its stacked LSTM layers, when no dropout separates them, as one
    ``kernels.FusedLSTMStack`` (the same layers and weights, in the same order).
    """
    if cfg.bidirectional:
        raise ValueError(
            "a language model predicts the next word, so it cannot read ahead: set model.bidirectional=false"
        )
    stateful = batch_size is not None
    body, head = layer_dtypes(precision)
    inputs = keras.Input(batch_shape=(batch_size, None), dtype="int32", name="tokens")
    embed_init = initializers(cfg).get("kernel_initializer", "uniform")
    x = keras.layers.Embedding(
        meta["vocab_size"],
        cfg.embedding_dim or cfg.units,
        embeddings_initializer=embed_init,
        dtype=body,
        name="embedding",
    )(inputs)
    if cfg.dropout:
        x = keras.layers.Dropout(cfg.dropout, name="dropout_0", dtype=body)(x)
    prefix = cells.prefix(cfg.cell)
    fuse = fused and stateful
    layers = [
        # Stateless, it reads any length, in a graph too (sampling traces it once): unrolling needs a fixed one.
        recurrent_layer(cfg, True, f"{prefix}_{i + 1}", stateful=stateful, dtype=body, fused=fuse, unroll=stateful)
        for i in range(cfg.layers)
    ]
    if wavefront and not cfg.dropout and kernels.FusedLSTMStack.takes(layers):
        layers = [kernels.FusedLSTMStack(layers, dtype=body, name=f"{prefix}_stack")]
    for i, layer in enumerate(layers):
        x = layer(x)
        if cfg.dropout:
            x = keras.layers.Dropout(cfg.dropout, name=f"dropout_{i + 1}", dtype=body)(x)
    dense_init = initializers(cfg)
    dense = Bfloat16GradDense if precision == "bfloat16_grad" and stateful else keras.layers.Dense
    logits = dense(
        meta["vocab_size"],
        kernel_initializer=dense_init.get("kernel_initializer", "glorot_uniform"),
        bias_initializer=dense_init.get("bias_initializer", "zeros"),
        dtype=head,
        name="logits",
    )(x)
    if head is not None:  # the loss and generation read float32 logits
        logits = keras.layers.Activation("linear", dtype="float32", name="logits_float32")(logits)
    return keras.Model(inputs, logits, name=f"{cells.prefix(cfg.cell)}_lm_{meta['name']}")


def reset_states(model: keras.Model) -> None:
    """Zero the carried state of every stateful recurrent layer (new epoch, or before evaluating)."""
    for layer in model.layers:
        if getattr(layer, "stateful", False):
            layer.reset_states()


@keras.saving.register_keras_serializable("rnnlab")
class SequenceLoss(keras.losses.Loss):
    """Cross-entropy summed over the window's time steps and averaged over the batch: the TF tutorial's cost, so
    that its learning rate (1.0) and clipping norm (5) mean the same here. Per-token loss = this / ``steps``.
    ``fused``: computed by ``kernels.sparse_xent`` (same values, 4x faster on a CPU than TF's fused op)."""

    def __init__(self, steps: int, name: str = "sequence_loss", fused: bool = False, **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.steps = steps
        self.fused = fused

    def call(self, y_true, y_pred):
        if not self.fused:
            return self.steps * keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        flat = kernels.sparse_xent(tf.reshape(y_true, [-1]), tf.reshape(y_pred, [-1, tf.shape(y_pred)[-1]]))
        return self.steps * tf.reshape(flat, tf.shape(y_true))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "steps": self.steps, "fused": self.fused}


def build_model(
    cfg: Any, meta: dict[str, Any], batch_size: int | None = None, precision: str = "float32"
) -> keras.Model:
    """The model for a prepared dataset's task (``batch_size`` makes a language model stateful)."""
    if meta["kind"] in ("classification", "regression", "tagging"):
        return build_classifier(cfg, meta, precision)
    if meta["kind"] == "language_model":
        return build_language_model(cfg, meta, batch_size, precision)
    raise ValueError(f"no model head for task kind {meta['kind']!r}")


MAX_UNITS = 1 << 14  # the largest layer param_budget sizes to


def count_params(cfg: Any, meta: dict[str, Any], units: int) -> int:
    """Trainable parameters of the model the factory builds for ``meta`` with ``units`` (built, then dropped)."""
    sized = {**dict(cfg), "units": units}
    model = build_model(_Attrs(sized), meta)
    count = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    keras.backend.clear_session(free_memory=False)
    return count


class _Attrs(dict):
    """A plain dict read as attributes, as the builders read a model config."""

    __getattr__ = dict.__getitem__


def units_for_budget(cfg: Any, meta: dict[str, Any], budget: int) -> tuple[int, int]:
    """(units, parameter count): the units whose whole model, as built for this cell, depth, direction and dataset,
    has the trainable-parameter count nearest ``budget`` (counted on built models, so it cannot drift from them)."""
    counts: dict[int, int] = {}

    def count(units: int) -> int:
        if units not in counts:
            counts[units] = count_params(cfg, meta, units)
        return counts[units]

    low, high = 1, 2
    while count(high) < budget and high < MAX_UNITS:  # the count grows with units: bracket, then bisect
        low, high = high, min(2 * high, MAX_UNITS)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if count(mid) < budget else (low, mid)
    best = min((low, high), key=lambda u: (abs(count(u) - budget), u))
    return best, count(best)


@keras.saving.register_keras_serializable("rnnlab")
class FoldedClipSGD(keras.optimizers.SGD):
    """``keras.optimizers.SGD`` with ``global_clipnorm``, whose clipping scale multiplies the learning rate instead
    of every gradient: SGD's update is linear in the gradient, so this is the same update, with two fewer passes
    over the weights' gradients per step (the norm from ``tf.nn.l2_loss``, one op per tensor; no scaled copy) and
    the embedding's gradient never made dense. Measured alone on PTB-small's 4.4 million weights: 2.3-2.6 against
    3.7-4.3 ms per step. The norm is Keras' (an embedding row counted once per occurrence in the batch)."""

    def _clip_gradients(self, grads: list) -> list:
        if not self.global_clipnorm:
            return super()._clip_gradients(grads)
        present = [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads if g is not None]
        norm = tf.sqrt(2.0 * tf.add_n([tf.nn.l2_loss(g) for g in present]))
        clip = self.global_clipnorm
        self._clip_scale = clip * tf.minimum(1.0 / norm, 1.0 / clip) + (norm - norm)  # NaN if the norm is not finite
        return grads

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        if self.global_clipnorm:
            learning_rate = learning_rate * self._clip_scale
        super().update_step(gradient, variable, learning_rate)


def build_optimizer(cfg: Any, fused: bool = False) -> keras.optimizers.Optimizer:
    """An optimizer from ``cfg.optimizer``; gradients are clipped by their global norm when asked (``fused``: SGD
    folds the clipping into its learning rate, ``FoldedClipSGD``)."""
    common = {"learning_rate": cfg.learning_rate, "global_clipnorm": cfg.clip_global_norm}
    if cfg.name == "sgd":
        return (FoldedClipSGD if fused else keras.optimizers.SGD)(momentum=cfg.momentum, **common)
    if cfg.name == "adam":
        return keras.optimizers.Adam(beta_1=cfg.beta_1, beta_2=cfg.beta_2, epsilon=cfg.epsilon, **common)
    if cfg.name == "rmsprop":
        return keras.optimizers.RMSprop(rho=cfg.rho, momentum=cfg.momentum, epsilon=cfg.epsilon, **common)
    raise ValueError(f"unknown optimizer {cfg.name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")


def lr_schedule(cfg: Any) -> Callable[[int], float]:
    """Epoch -> learning rate: held for ``lr_decay_start`` epochs, then multiplied by ``lr_decay`` each epoch."""

    def schedule(epoch: int, _lr: float | None = None) -> float:
        return cfg.learning_rate * math.pow(cfg.lr_decay, max(0, epoch + 1 - cfg.lr_decay_start))

    return schedule
