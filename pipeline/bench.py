"""Benchmark: the pipeline's training path against plain Keras on the same model and batch, on this machine.

    python -m pipeline.bench                 # or: make bench (needs the prepared data: make run)
    python -m pipeline.bench bench.steps=20 bench.rounds=2

For each case (a preset) it times ``bench.steps`` training steps after a warm-up, alternating in one process (a) the
pipeline's path (``Task.train_epoch`` plus the epoch's MLflow logging, with the preset's speed settings) and (b)
``model.fit`` of the same model written as a plain Keras script, with Keras' defaults, and for a language model
(d) the hand-tuned plain script ``pipeline/baselines/plain_tuned.py`` (unrolled stateful LSTMs, one compiled
GradientTape step, clip, SGD, float32); the headline ratio is against the faster baseline. It also times (c) the
pipeline's path with tracking off, and once a no-op ``dvc repro`` and each dataset's prepare stage. Each case's
throughput is also given as a fraction of the machine's arithmetic limit for its model (``pipeline.speed.limit``:
every matmul of a step at the rate this machine runs that shape and dtype).
Results: ``reports/bench.json`` and ``reports/bench.md``.
"""

from __future__ import annotations

import logging
import math
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
import keras
import pandas as pd
from hydra import compose
from omegaconf import DictConfig

from pipeline import cells, config, data, models, speed, tasks, tracking
from pipeline.baselines import plain_tuned
from pipeline.data import registry

log = logging.getLogger(__name__)

config.register()


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


class StepTimes(keras.callbacks.Callback):
    """Per-batch times inside ``fit``: the baseline's steady step speed, without fit's per-call set-up."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.times.append(time.perf_counter() - self.started)


def tuned_baseline(task: tasks.Task, x, y):
    """For a language model, the hand-tuned plain script (``pipeline/baselines/plain_tuned.py``) on the same model
    shapes and windows: a function that trains one epoch of them; None for a classifier (plain fit is its
    baseline)."""
    if task.dataset.meta["kind"] != "language_model":
        return None
    m, o, batch, steps = task.cfg.model, task.cfg.optimizer, task.batch_size, task.steps
    model = plain_tuned.build(task.dataset.meta["vocab_size"], m.units, m.layers, batch, steps, m.init_scale or 0.05)
    step = plain_tuned.train_step(model, o.learning_rate, o.clip_global_norm or 1e9)
    xs = x.astype("int32").reshape(-1, batch, steps)
    ys = y.astype("int32").reshape(-1, batch, steps)

    def epoch() -> None:
        for xb, yb in zip(xs, ys, strict=True):
            step(xb, yb)

    return epoch


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_case(name: str, cfg: DictConfig, rounds: int) -> dict[str, Any]:
    tasks.setup_runtime(cfg)
    dataset = data.load(cfg.paths.data, cfg.data.name)
    task = tasks.make(cfg, dataset)
    baseline = plain_keras(task)
    x, y = task.train_arrays(0)
    units = task.units(x)
    batch = cfg.trainer.batch_size
    steps = math.ceil(len(x) / batch)
    step_times = StepTimes()
    times: dict[str, list[float]] = {"pipeline": [], "keras": [], "untracked": [], "tracking": [], "tuned": []}
    tuned = tuned_baseline(task, x, y)

    with tracking.start_run(cfg, {"dataset": cfg.data.name, "cell": cfg.model.cell, "bench": name}) as tracker:

        def pipeline_path() -> None:
            metrics = task.train_epoch(0)
            times["tracking"].append(timed(lambda: tracker.log_metrics(metrics, step=0)))

        def untracked_path() -> None:
            task.train_epoch(0)

        def keras_path() -> None:
            baseline.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[step_times])

        for fn in (pipeline_path, keras_path, untracked_path, tuned or (lambda: None)):  # warm-up: tracing, compiling
            fn()
        times["tracking"].clear()
        step_times.times.clear()
        for _ in range(rounds):  # alternating, so that a slow spell of the machine hits both
            times["pipeline"].append(timed(pipeline_path))
            times["keras"].append(timed(keras_path))
            times["untracked"].append(timed(untracked_path))
            if tuned:
                times["tuned"].append(timed(tuned))
    bound = speed.task_limit(task)  # the machine's matmul rates at this model's shapes
    per_step = {k: [t / steps for t in v] for k, v in times.items() if v}
    rate = {k: units / statistics.median(v) for k, v in times.items() if v}
    steady = units / (steps * statistics.median(step_times.times))
    fastest = max(rate["keras"], rate.get("tuned", 0.0))
    return {
        "case": name,
        "unit": task.unit,
        "steps": steps,
        "batch": batch,
        "precision": task.precision,
        "pipeline_per_sec": round(rate["pipeline"]),
        "keras_per_sec": round(rate["keras"]),
        "ratio_pipeline_over_keras": round(rate["pipeline"] / rate["keras"], 3),
        "plain_tuned_per_sec": round(rate["tuned"]) if "tuned" in rate else None,
        "ratio_over_fastest_baseline": round(rate["pipeline"] / fastest, 3),
        "limit_per_sec": round(bound["per_sec"]),
        "fraction_of_limit": round(rate["pipeline"] / bound["per_sec"], 3),
        "keras_steady_per_sec": round(steady),
        "ratio_over_keras_steady": round(rate["pipeline"] / steady, 3),
        "pipeline_step_ms_median": round(1000 * statistics.median(per_step["pipeline"]), 2),
        "pipeline_step_ms_spread": round(1000 * (max(per_step["pipeline"]) - min(per_step["pipeline"])), 2),
        "keras_step_ms_median": round(1000 * statistics.median(per_step["keras"]), 2),
        "keras_step_ms_spread": round(1000 * (max(per_step["keras"]) - min(per_step["keras"])), 2),
        "tracking_overhead_pct": round(
            100 * statistics.median(times["tracking"]) / statistics.median(times["untracked"]), 2
        ),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def noop_repro_seconds(root: Path) -> float | None:
    dvc = Path(sys.executable).parent / "dvc"
    done = subprocess.run([str(dvc), "status", "-q"], cwd=root, capture_output=True)
    if done.returncode != 0:
        return None  # the pipeline is not up to date: a repro would not be a no-op
    started = time.perf_counter()
    subprocess.run([str(dvc), "repro"], cwd=root, capture_output=True, check=True)
    return round(time.perf_counter() - started, 2)


def prepare_seconds(cfg: DictConfig, store: Path) -> dict[str, float]:
    """Each dataset's prepare stage, from the raw files already downloaded, into a scratch folder."""
    out = {}
    for name in ("toy", "ptb", "mnist", "imdb"):
        run_cfg = compose(config_name="prepare", overrides=[f"data={name}", f"paths.data={store}/data"])
        raw = Path(cfg.paths.data) / "raw" / name
        if raw.exists():
            (store / "data" / "raw").mkdir(parents=True, exist_ok=True)
            (store / "data" / "raw" / name).symlink_to(raw)
        elif name != "toy":
            continue
        config.validate(run_cfg, "prepare")
        out[name] = round(timed(lambda c=run_cfg: registry.prepare(c)), 2)
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    config.validate(cfg, "bench")
    unknown = [name for name in cfg.bench.cases if name not in speed.CASES]
    if unknown:  # before any case runs: a typo in the last one must not cost the minutes of the others
        raise ValueError(f"bench.cases: unknown case {unknown[0]!r}; choose from {', '.join(speed.CASES)}")
    results: dict[str, Any] = {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "keras": keras.__version__,
        "cpu": speed.cpu_model(),
        "cpu_bf16": models.cpu_bf16_matmul(),
        "cpu_flags": speed.cpu_flags(),
        "gpu": models.gpu_available(),
        "cases": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        for name in cfg.bench.cases:
            case_cfg = speed.case_config(cfg, speed.CASES[name], cfg.bench.steps, store)
            try:
                results["cases"].append(bench_case(name, case_cfg, cfg.bench.rounds))
            except data.DataError as err:
                log.warning("%s skipped: %s", name, err)
            log.info("%s: %s", name, results["cases"][-1] if results["cases"] else "-")
        if cfg.bench.pipeline_overheads:
            results["noop_dvc_repro_seconds"] = noop_repro_seconds(Path(cfg.paths.root))
            results["prepare_seconds"] = prepare_seconds(cfg, store)
    out = Path(cfg.paths.reports)
    data.write_json(out / "bench.json", results)
    table = pd.DataFrame(results["cases"])
    machine = ", ".join(filter(None, [results["cpu"], results["cpu_flags"], "GPU" if results["gpu"] else None]))
    lines = ["# Benchmark", "", f"{machine}; Python {results['python']}, Keras {results['keras']}", ""]
    if not table.empty:
        lines += [table.to_markdown(index=False), ""]
    for key in ("noop_dvc_repro_seconds", "prepare_seconds"):
        if key in results:
            lines.append(f"- {key}: {results[key]}")
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    return results


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print((Path(cfg.paths.reports) / "bench.md").read_text() if run(cfg) else "")


if __name__ == "__main__":
    main()
