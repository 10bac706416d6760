"""The plain Keras baseline: the pipeline's model as a plain Keras script writes it, trained with ``model.fit``. The
benchmark builds it in process (``plain_keras``), and its whole-run timing runs this module as its own process over
the same steps as the pipeline, from the same config overrides:

    python -m pipeline.baselines.plain_fit experiment=toy_dynamic trainer.max_steps_per_epoch=100

It prints one JSON line: the units (samples or tokens) trained, the steps and the seconds inside ``fit``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import keras
from hydra import compose, initialize_config_dir

from pipeline import cells, config, data, models, tasks


def plain_keras(task: tasks.Task) -> keras.Model:
    """The same model as a plain Keras script would write it: Sequential, the same layers (masking, stateful
    recurrent layers for the language model), optimizer, loss and metrics, and Keras' defaults for everything the
    pipeline tunes (no unrolling, float32, one step per call)."""
    m, meta, batch = task.cfg.model, task.dataset.meta, task.batch_size
    lm = meta["kind"] == "language_model"
    if meta["input"] == "tokens":
        layers: list = [
            keras.Input(batch_shape=(batch, None), dtype="int32") if lm else keras.Input((None,), dtype="int32")
        ]
        layers.append(keras.layers.Embedding(meta["vocab_size"], m.embedding_dim or m.units, mask_zero=not lm))
    else:
        layers = [keras.Input((None, meta["features"]))]
        if meta.get("pad_value") is not None:
            layers.append(keras.layers.Masking(meta["pad_value"]))
    if lm and m.dropout:
        layers.append(keras.layers.Dropout(m.dropout))
    cell = cells.get(m.cell).keras_class()  # the Keras class itself, with none of the pipeline's settings
    for i in range(m.layers):
        rnn = cell(m.units, return_sequences=lm or i < m.layers - 1, stateful=lm, recurrent_dropout=m.recurrent_dropout)
        layers.append(keras.layers.Bidirectional(rnn) if m.bidirectional else rnn)
        if m.dropout:
            layers.append(keras.layers.Dropout(m.dropout))
    if lm:
        layers.append(keras.layers.Dense(meta["vocab_size"]))
        loss, metrics = keras.losses.SparseCategoricalCrossentropy(from_logits=True), []
    else:
        layers.append(keras.layers.Dense(meta["num_classes"], activation="softmax"))
        loss, metrics = "sparse_categorical_crossentropy", ["accuracy"]
    model = keras.Sequential(layers)
    model.compile(optimizer=models.build_optimizer(task.cfg.optimizer), loss=loss, metrics=metrics)
    return model


def run(overrides: list[str]) -> dict[str, Any]:
    """One epoch of ``fit`` over the config's training arrays (``trainer.max_steps_per_epoch`` caps it), composed
    from ``overrides`` as ``python -m pipeline.train`` composes its own."""
    config.register()
    with initialize_config_dir(config_dir=str(config.ROOT / "conf"), version_base="1.3"):
        cfg = config.validate(compose(config_name="config", overrides=overrides), "config")
    tasks.setup_runtime(cfg)
    # The task's data, batches and settings without the pipeline's model: building that would charge the
    # baseline's whole run for a model it never trains.
    task = tasks.make(cfg, data.load(cfg.paths.data, cfg.data.name), build=False)
    model = plain_keras(task)
    x, y = task.train_arrays(0)
    started = time.perf_counter()
    model.fit(x, y, batch_size=task.batch_size, epochs=1, shuffle=False, verbose=0)
    seconds = time.perf_counter() - started
    return {"units": task.units(x), "steps": math.ceil(len(x) / task.batch_size), "fit_seconds": round(seconds, 3)}


def main() -> None:
    print(json.dumps(run(sys.argv[1:])))


if __name__ == "__main__":
    main()
