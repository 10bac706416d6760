"""Text from a language model: a prime's word ids, then one word at a time, greedy or sampled (temperature, top-k).

Used by the generate stage (a logged model) and by training, which writes samples after each epoch.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

STRATEGIES = ("greedy", "sample")
UNK = "<unk>"


def encode_prime(prime: str, vocab: list[str]) -> list[int]:
    """Word ids of ``prime``; unknown words become ``<unk>`` with a warning rather than an error."""
    index = {word: i for i, word in enumerate(vocab)}
    unknown = [word for word in prime.split() if word not in index]
    if unknown:
        log.warning("not in the vocabulary, read as %s: %s", UNK, " ".join(unknown))
    return [index.get(word, index[UNK]) for word in prime.split()]


def next_word(logits: np.ndarray, strategy: str, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """Pick the next id from one step's logits. Temperature 0 is the limit of ever sharper sampling: greedy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if temperature < 0:
        raise ValueError(f"temperature must be at least 0 (0 = greedy), got {temperature}")
    if strategy == "greedy" or temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if top_k:
        cutoff = np.sort(scaled)[-min(top_k, len(scaled))]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def generate(
    model: keras.Model,
    vocab: list[str],
    prime: str,
    words: int,
    strategy: str = "sample",
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    context: int = 100,
) -> list[str]:
    """``words`` words continuing ``prime``. The model reads the last ``context`` ids afresh at every step, so
    any stateless language model (the form logged to MLflow) works."""
    return continuations(model, vocab, prime, words, [Pick(strategy, temperature, top_k, seed)], context)[0]


@dataclass(frozen=True)
class Pick:
    """How one continuation picks its next word (see ``next_word``)."""

    strategy: str = "sample"
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0


def continuations(
    model: keras.Model, vocab: list[str], prime: str, words: int, picks: list[Pick], context: int = 100
) -> list[list[str]]:
    """One continuation of ``prime`` per pick, all of them rows of one batch: a model call per word for all, as
    fast as one alone (training logs a greedy and a sampled one after every epoch). Each row draws from its own
    seeded generator, so a row's words do not depend on the others."""
    start = encode_prime(prime, vocab) or [vocab.index("<eos>")]
    ids = np.array([start] * len(picks), dtype=np.int32)
    rngs = [np.random.default_rng(pick.seed) for pick in picks]
    last = last_logits(model)
    for _ in range(words):
        logits = last(ids[:, -context:])
        chosen = [
            next_word(row, pick.strategy, pick.temperature, pick.top_k, rng)
            for row, pick, rng in zip(logits, picks, rngs, strict=True)
        ]
        ids = np.concatenate([ids, np.array(chosen, dtype=np.int32)[:, None]], axis=1)
    return [[vocab[i] for i in row[len(start) :]] for row in ids]


_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its traced last_logits


def last_logits(model: keras.Model) -> Callable[[np.ndarray], np.ndarray]:
    """The model's logits at each row's last position, as one graph traced once for any batch and length (and kept
    while the model lives): called eagerly, every word paid Keras' per-call overhead, 20 words of PTB-small 1.0 s
    against 0.3. A model that needs a fixed length (an unrolled layer: older logged models) is called eagerly."""
    if model not in _TRACED:
        ref = weakref.ref(model)  # the kept function must not keep its key (the model) alive
        traced = tf.function(
            lambda ids: ref()(ids, training=False)[:, -1],
            input_signature=[tf.TensorSpec([None, None], tf.int32)],
            autograph=False,
        )
        try:
            traced.get_concrete_function()
            _TRACED[model] = lambda ids: traced(ids).numpy()
        except ValueError:  # "Cannot unroll a RNN if the time dimension is undefined"
            _TRACED[model] = lambda ids: np.asarray(ref()(ids, training=False))[:, -1]
    return _TRACED[model]
