"""Benchmark: the pipeline's training path against plain Keras on the same model and batch, on this machine.

    python -m pipeline.bench                 # or: make bench (needs the prepared data: make run)
    python -m pipeline.bench bench.steps=20 bench.rounds=2

For each case (a preset) it times ``bench.steps`` training steps after a warm-up, alternating in one process (a) the
pipeline's path (``Task.train_epoch`` plus the epoch's MLflow logging, with the preset's speed settings) and (b)
``model.fit`` of the same model written as a plain Keras script (``pipeline/baselines/plain_fit.py``), with Keras'
defaults, and for a language model (d) the hand-tuned plain script ``pipeline/baselines/plain_tuned.py`` (unrolled
stateful LSTMs, one compiled GradientTape step, clip, SGD, float32); the headline ratio is against the faster baseline.
It also times (c) the pipeline's path with tracking off, and once a no-op ``dvc repro`` and each dataset's prepare
stage. Each case's throughput is also given as a fraction of the machine's arithmetic limit for its model
(``pipeline.speed.limit``: every matmul of a step at the rate this machine runs that shape and dtype), and against the
limit at the machine's matmul rate (one large square float32 matmul, ``speed.machine_rate``, measured once per process):
how far the model's own shapes keep it from the machine's best.

Machine classes (``bench.isa``): ``native`` runs in this process; ``avx2`` runs the same cases, steps and rounds in a
child ``pipeline.bench`` whose oneDNN and XLA dispatch stop at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``,
``XLA_FLAGS=--xla_cpu_max_isa=AVX2``; precision ``auto`` then resolves to float32, as on an AVX2-only CPU). The
child writes into a temporary folder (``bench.results_to``) and its cases come back with ``isa: avx2``. On a CPU
that is itself AVX2-only the two classes run the same kernels.

Whole runs (``bench.whole_run_steps`` steps, ``bench.whole_run_repeats`` round-robin repeats, for the cases in
``bench.whole_run_cases``): each program as its
own process from spawn to exit, start-up, imports, compiling and evaluation included: ``pipeline.train`` on the
case's overrides (one epoch of that many steps) with its compiled loops loaded from ``trainer.compile_cache`` (as in
a sweep's later jobs or any run after a machine's first), the same with the cache off (``pipeline_compiling``: a
first run), ``pipeline.baselines.plain_fit`` on the same overrides, and for a language model
``pipeline.baselines.plain_tuned`` at the case's shapes (the baselines compile on their own, without the cache); per
program min / median / max seconds and units/s on the median, in each class.
Results: ``reports/bench.json`` and ``reports/bench.md``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
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

from pipeline import config, data, models, speed, tasks, tracking, xla_cache
from pipeline.baselines import plain_tuned
from pipeline.baselines.plain_fit import plain_keras
from pipeline.data import registry

log = logging.getLogger(__name__)
REPO = config.ROOT  # the checkout: where the child processes start

config.register()


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
    machine = speed.machine_rate()  # and its rate at one large square matmul (measured once per process)
    at_machine = bound["units_per_step"] / (bound["gflop_per_step"] / machine)
    per_step = {k: [t / steps for t in v] for k, v in times.items() if v}
    rate = {k: units / statistics.median(v) for k, v in times.items() if v}
    steady = units / (steps * statistics.median(step_times.times))
    fastest = max(rate["keras"], rate.get("tuned", 0.0))
    return {
        "case": name,
        "isa": "native",  # the class this process is (an emulated class's child is relabelled by its parent)
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
        "machine_gflop_per_sec": round(machine, 1),
        "limit_at_machine_rate_per_sec": round(at_machine),
        "fraction_of_machine_limit": round(rate["pipeline"] / at_machine, 4),
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


def emulated_env(isa: str) -> dict[str, str]:
    """This process's environment with oneDNN's and XLA's dispatch capped at ``isa`` (AVX2): the kernels an
    AVX2-only CPU runs, on this one. ``models.cpu_bf16_matmul`` reads the cap too, so precision ``auto`` picks
    float32 as it would there."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa.upper())
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), f"--xla_cpu_max_isa={isa.upper()}"]))
    return env


def run_checked(command: list[str], env: dict[str, str]) -> str:
    """Run a command from the checkout; its stdout, or an error that carries the end of its stderr."""
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def whole_run_names(cfg: DictConfig) -> list[str]:
    """The cases timed as whole runs: ``bench.whole_run_cases``, where null means every case and [] none."""
    if not cfg.bench.whole_run_steps:
        return []
    names = cfg.bench.whole_run_cases
    return list(cfg.bench.cases) if names is None else [name for name in cfg.bench.cases if name in names]


def emulated_cases(cfg: DictConfig, isa: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The same cases, steps and rounds in a child ``pipeline.bench`` whose environment emulates ``isa``; it writes
    its results into a temporary folder (never reports/), and its cases come back labelled with the class."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "pipeline.bench",
            f"bench.cases=[{','.join(cfg.bench.cases)}]",
            f"bench.steps={cfg.bench.steps}",
            f"bench.rounds={cfg.bench.rounds}",
            "bench.isa=[native]",  # the child is "native" to its own capped environment
            f"bench.whole_run_steps={cfg.bench.whole_run_steps or 0}",  # its whole runs inherit the caps
            f"bench.whole_run_repeats={cfg.bench.whole_run_repeats}",
            f"bench.whole_run_cases=[{','.join(whole_run_names(cfg))}]",
            "bench.pipeline_overheads=false",
            f"bench.results_to={tmp}",
            f"paths.root={cfg.paths.root}",
            f"paths.data={cfg.paths.data}",
            f"hydra.run.dir={tmp}/hydra",
        ]  # fmt: skip
        env = emulated_env(isa)
        run_checked(command, env)
        child = json.loads((Path(tmp) / "bench.json").read_text())
    described = {"cpu_bf16": child["cpu_bf16"], "env": {k: env[k] for k in ("ONEDNN_MAX_CPU_ISA", "XLA_FLAGS")}}
    return [{**case, "isa": isa} for case in child["cases"]], described


def whole_run_commands(cfg: DictConfig, name: str, store: Path) -> dict[str, list[str]]:
    """Each program of a case's whole-run timing as a command: the pipeline's training entry point and the plain
    ``fit`` script from the same overrides (``speed.case_overrides``: the same preset and steps), and for a language
    model the hand-tuned script at the case's shapes."""
    steps = cfg.bench.whole_run_steps
    overrides = [*speed.case_overrides(cfg, speed.CASES[name], steps, store), "trainer.epochs=1"]
    train, run_dir = [sys.executable, "-m", "pipeline.train", *overrides], f"hydra.run.dir={store}/hydra"
    commands = {
        "pipeline": [*train, run_dir],
        "pipeline_compiling": [*train, "trainer.compile_cache=null", run_dir],  # a machine's first run: XLA compiles
        "plain_fit": [sys.executable, "-m", "pipeline.baselines.plain_fit", *overrides],
    }
    case_cfg = compose(config_name="config", overrides=overrides)
    if case_cfg.data.kind == "language_model":
        m, t = case_cfg.model, case_cfg.trainer
        shapes = ["--units", m.units, "--layers", m.layers, "--batch", t.batch_size, "--window", t.bptt_steps]
        prepared = Path(cfg.paths.data) / "prepared" / case_cfg.data.name
        commands["plain_tuned"] = [
            *[sys.executable, "-m", "pipeline.baselines.plain_tuned", str(prepared), "--steps", str(steps)],
            *map(str, shapes),
        ]
    return commands


def whole_run(cfg: DictConfig, name: str, store: Path) -> dict[str, Any]:
    """Each program from spawn to exit (start-up, imports, compiling, evaluation), round-robin over the repeats, so
    that a slow spell of the machine hits all of them; units/s on the median. The units are what plain ``fit``
    reports it trained, the same arrays as the pipeline's."""
    commands = whole_run_commands(cfg, name, store)
    seconds: dict[str, list[float]] = {program: [] for program in commands}
    units = 0
    for _ in range(cfg.bench.whole_run_repeats):
        for program, command in commands.items():
            started = time.perf_counter()
            out = run_checked(command, xla_cache.without_ours(os.environ))  # each program compiles as it would alone
            seconds[program].append(time.perf_counter() - started)
            if program == "plain_fit":
                units = json.loads(out.strip().splitlines()[-1])["units"]
    programs = {
        program: {
            "seconds_min": round(min(s), 2),
            "seconds_median": round(statistics.median(s), 2),
            "seconds_max": round(max(s), 2),
            "per_sec": round(units / statistics.median(s), 1),
        }
        for program, s in seconds.items()
    }
    fastest = max(p["per_sec"] for program, p in programs.items() if not program.startswith("pipeline"))
    return {
        "steps": cfg.bench.whole_run_steps,
        "repeats": cfg.bench.whole_run_repeats,
        "units": units,
        "programs": programs,
        "whole_run_ratio_over_fastest_baseline": round(programs["pipeline"]["per_sec"] / fastest, 3),
        "whole_run_ratio_compiling_over_fastest_baseline": round(
            programs["pipeline_compiling"]["per_sec"] / fastest, 3
        ),
    }


def native_cases(cfg: DictConfig, store: Path) -> list[dict[str, Any]]:
    """Every case in this process, each followed by its whole-run timing when ``bench.whole_run_steps`` asks."""
    cases = []
    for name in cfg.bench.cases:
        case_cfg = speed.case_config(cfg, speed.CASES[name], cfg.bench.steps, store)
        try:
            cases.append(bench_case(name, case_cfg, cfg.bench.rounds))
        except data.DataError as err:
            log.warning("%s skipped: %s", name, err)
            continue
        if name in whole_run_names(cfg):
            cases[-1]["whole_run"] = whole_run(cfg, name, store)
        log.info("%s: %s", name, cases[-1])
    return cases


# The packages, besides Python and Keras, whose versions move the figures (kernels, start-up), as bench.json records.
STACK = ("tensorflow-cpu", "tensorflow", "numpy", "ml_dtypes", "mlflow")


def stack_versions() -> dict[str, str]:
    """The installed versions of the packages in ``STACK`` (those present): a figure depends on them (ml_dtypes 0.7.0
    alone added 0.55 s to every process's start)."""
    found = {}
    for name in STACK:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def run(cfg: DictConfig) -> dict[str, Any]:
    config.validate(cfg, "bench")
    unknown = [name for name in cfg.bench.cases if name not in speed.CASES]
    if unknown:  # before any case runs: a typo in the last one must not cost the minutes of the others
        raise ValueError(f"bench.cases: unknown case {unknown[0]!r}; choose from {', '.join(speed.CASES)}")
    results: dict[str, Any] = {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "keras": keras.__version__,
        "stack": stack_versions(),
        "cpu": speed.cpu_model(),
        "cpu_bf16": models.cpu_bf16_matmul(),
        "cpu_flags": speed.cpu_flags(),
        "gpu": models.gpu_available(),
        "classes": {},
        "cases": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        for isa in cfg.bench.isa:
            if isa == "native":
                results["cases"] += native_cases(cfg, store)
                results["classes"][isa] = {"cpu_bf16": results["cpu_bf16"], "env": {}}
            else:
                cases, results["classes"][isa] = emulated_cases(cfg, isa)
                results["cases"] += cases
        if cfg.bench.pipeline_overheads:
            results["noop_dvc_repro_seconds"] = noop_repro_seconds(Path(cfg.paths.root))
            results["prepare_seconds"] = prepare_seconds(cfg, store)
    if cfg.bench.results_to:  # an emulated class's child: its parent merges and writes the reports
        data.write_json(Path(cfg.bench.results_to) / "bench.json", results)
    else:
        write_reports(Path(cfg.paths.reports), results)
    return results


def whole_run_table(cases: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per case and program of the whole-run timings."""
    rows = []
    for c in cases:
        runs = c.get("whole_run")
        for program, p in runs["programs"].items() if runs else ():
            ratio = {
                "pipeline": runs["whole_run_ratio_over_fastest_baseline"],
                "pipeline_compiling": runs["whole_run_ratio_compiling_over_fastest_baseline"],
            }.get(program)
            rows.append({"case": c["case"], "isa": c["isa"], "program": program, "steps": runs["steps"], **p})
            rows[-1] |= {"unit": c["unit"], "ratio_over_fastest_baseline": ratio}
    return pd.DataFrame(rows)


def write_reports(out: Path, results: dict[str, Any]) -> None:
    """``bench.json`` (everything) and ``bench.md``: the machine, the classes, the cases, the whole runs."""
    data.write_json(out / "bench.json", results)
    table = pd.DataFrame([{k: v for k, v in case.items() if k != "whole_run"} for case in results["cases"]])
    machine = ", ".join(filter(None, [results["cpu"], results["cpu_flags"], "GPU" if results["gpu"] else None]))
    stack = "".join(f", {name} {version}" for name, version in results["stack"].items())
    lines = ["# Benchmark", "", f"{machine}; Python {results['python']}, Keras {results['keras']}{stack}", ""]
    for isa, described in results["classes"].items():
        env = " ".join(f"{k}={v}" for k, v in described["env"].items()) or "the machine as it is"
        lines.append(f"- class `{isa}`: {env}; bfloat16 matmul instructions: {described['cpu_bf16']}")
    lines.append("")
    if not table.empty:
        lines += [table.to_markdown(index=False), ""]
    runs = whole_run_table(results["cases"])
    if not runs.empty:
        lines += ["## Whole runs (each program its own process, spawn to exit)", "", runs.to_markdown(index=False), ""]
    for key in ("noop_dvc_repro_seconds", "prepare_seconds"):
        if key in results:
            lines.append(f"- {key}: {results[key]}")
    (out / "bench.md").write_text("\n".join(lines) + "\n")


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)
    if not cfg.bench.results_to:  # a child's results go to its parent, not to the terminal
        print((Path(cfg.paths.reports) / "bench.md").read_text())


if __name__ == "__main__":
    main()
