"""The strongest plain baseline for the PTB language model: what a competent Keras user writes by hand, and what
``make bench`` times beside the pipeline (``plain_tuned``). It runs alone:

    python -m pipeline.baselines.plain_tuned data/prepared/ptb --steps 200

Stateful LSTMs unrolled over the window, one ``tf.function`` train step (GradientTape, clip by global norm, SGD),
float32, one Python call per step; the PTB-small shapes by default (Zaremba et al. 2014: 2 x 200 units, batch 20,
20 steps, lr 1.0, clip 5, uniform init 0.1).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf


def build(vocab: int, units: int = 200, layers: int = 2, batch: int = 20, steps: int = 20, scale: float = 0.1):
    init = keras.initializers.RandomUniform(-scale, scale, seed=1)
    inputs = keras.Input(batch_shape=(batch, steps), dtype="int32")
    h = keras.layers.Embedding(vocab, units, embeddings_initializer=init)(inputs)
    for _ in range(layers):
        lstm = keras.layers.LSTM(units, return_sequences=True, stateful=True, unroll=True,
                                 kernel_initializer=init, recurrent_initializer=init)  # fmt: skip
        h = lstm(h)
    logits = keras.layers.Dense(vocab, kernel_initializer=init)(h)
    return keras.Model(inputs, logits)


def train_step(model: keras.Model, learning_rate: float = 1.0, clip: float = 5.0):
    """One compiled step: forward, summed-over-window cross-entropy, gradients clipped by global norm, SGD."""
    optimizer = keras.optimizers.SGD(learning_rate)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True)) * x.shape[1]
        grads = tape.gradient(loss, model.trainable_variables)
        grads, _ = tf.clip_by_global_norm(grads, clip)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    return step


def windows(ids: np.ndarray, batch: int, steps: int):
    """Consecutive (x, y) windows of ``batch`` parallel token streams, as the TF tutorial's ptb_producer."""
    streams = ids[: len(ids) // batch * batch].reshape(batch, -1)
    for i in range((streams.shape[1] - 1) // steps):
        yield streams[:, i * steps : (i + 1) * steps], streams[:, i * steps + 1 : (i + 1) * steps + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a prepared PTB folder (train.npz with 'ids', meta.json)")
    parser.add_argument("--steps", type=int, default=200, help="training steps to time")
    parser.add_argument("--units", type=int, default=200, help="LSTM units per layer")
    parser.add_argument("--layers", type=int, default=2, help="stacked LSTM layers")
    parser.add_argument("--batch", type=int, default=20, help="parallel token streams")
    parser.add_argument("--window", type=int, default=20, help="tokens per window (steps of back-propagation)")
    args = parser.parse_args()
    ids = np.load(args.data / "train.npz")["ids"].astype("int32")
    model = build(int(ids.max()) + 1, args.units, args.layers, args.batch, args.window)
    step = train_step(model)
    batches = windows(ids, args.batch, args.window)
    step(*next(batches))  # trace and compile
    started = time.perf_counter()
    for _, (x, y) in zip(range(args.steps), batches, strict=False):
        loss = step(x, y)
    seconds = time.perf_counter() - started
    tokens = args.steps * args.batch * args.window
    print(f"{tokens / seconds:.0f} tokens/s, last loss {float(loss) / args.window:.3f} per token")


if __name__ == "__main__":
    main()
