"""The benchmark harness on the toy case: a real (tiny) run whose numbers must agree with each other, with a known
tracking cost injected so that the tracking overhead has a value to find."""

import json
import math
import os
import time
from pathlib import Path

import pytest
from hydra import initialize_config_dir

from pipeline import bench, models, prepare, tracking
from tests.conftest import CONF

DELAY = 0.25  # seconds added to every metrics write: far above the real sqlite write and the toy epoch


@pytest.fixture
def slow_tracking(monkeypatch):
    """Every ``Tracker.log_metrics`` takes ``DELAY`` seconds longer (then writes to the store as usual)."""
    log_metrics = tracking.Tracker.log_metrics

    def slow(self, metrics, step=0):
        time.sleep(DELAY)
        log_metrics(self, metrics, step)

    monkeypatch.setattr(tracking.Tracker, "log_metrics", slow)


def agrees(value: float, expected: float, rel: float) -> bool:
    return math.isclose(value, expected, rel_tol=rel)


@pytest.mark.integration  # a timed benchmark run: ~10 s
def test_bench_numbers_agree_with_each_other_and_with_the_machine(make_cfg, tmp_path, slow_tracking):
    prepare.run(make_cfg(top="prepare"))
    cfg = make_cfg(
        "bench.cases=[toy_lstm]", "bench.steps=10", "bench.rounds=3", "bench.pipeline_overheads=false", top="bench"
    )
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        results = bench.run(cfg)
    (case,) = results["cases"]
    assert (case["case"], case["unit"], case["steps"], case["precision"]) == ("toy_lstm", "samples", 10, "float32")
    samples = case["steps"] * case["batch"]  # an epoch capped at 10 steps of full batches
    # Rate and time per step are two views of the same timings: rate x seconds per epoch = samples per epoch.
    for path in ("pipeline", "keras"):
        seconds = case[f"{path}_step_ms_median"] * case["steps"] / 1000
        assert agrees(case[f"{path}_per_sec"] * seconds, samples, rel=0.01), path
        assert case[f"{path}_step_ms_spread"] >= 0
    ratio = case["pipeline_per_sec"] / case["keras_per_sec"]
    assert agrees(case["ratio_pipeline_over_keras"], ratio, rel=0.01)
    assert case["plain_tuned_per_sec"] is None  # the hand-tuned script is a language model's baseline
    assert case["ratio_over_fastest_baseline"] == case["ratio_pipeline_over_keras"]
    assert agrees(case["ratio_over_keras_steady"], case["pipeline_per_sec"] / case["keras_steady_per_sec"], rel=0.01)
    assert agrees(case["fraction_of_limit"], case["pipeline_per_sec"] / case["limit_per_sec"], rel=0.01)
    assert 0 < case["fraction_of_limit"] < 1  # nothing runs faster than its matmuls alone
    # The pipeline's epoch = the untracked epoch + the tracking write (>= DELAY): the overhead is that write over
    # the untracked epoch, so the untracked epoch it implies is what remains of the pipeline's epoch after it.
    pipeline_epoch = case["pipeline_step_ms_median"] * case["steps"] / 1000
    assert pipeline_epoch > DELAY
    implied_untracked = 100 * DELAY / case["tracking_overhead_pct"]
    assert 0.5 < implied_untracked / (pipeline_epoch - DELAY) < 1.5, (implied_untracked, pipeline_epoch)
    # The machine line: /proc/cpuinfo's model name and the core count; bfloat16 as the models module sees it.
    assert results["cpu"] == f"{cpuinfo_model()} x{os.cpu_count()}"
    assert results["cpu_bf16"] == models.cpu_bf16_matmul() and results["gpu"] == models.gpu_available()
    written = json.loads((tmp_path / "reports/bench.json").read_text())
    assert written["cases"] == [case] and written["cpu"] == results["cpu"]
    table = (tmp_path / "reports/bench.md").read_text()
    assert table.splitlines()[2].startswith(results["cpu"]) and "| toy_lstm " in table


def cpuinfo_model() -> str:
    line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    return line.split(":", 1)[1].strip()


def test_an_unknown_case_is_named_with_the_known_ones(make_cfg):
    cfg = make_cfg("bench.cases=[toy_lstm,ptb_tiny]", top="bench")
    with pytest.raises(ValueError, match=r"unknown case 'ptb_tiny'; choose from toy_lstm, ptb_small_lstm, "):
        bench.run(cfg)
    assert not (Path(cfg.paths.reports) / "bench.json").exists()  # nothing ran


def test_the_plain_tuned_baseline_cuts_windows_as_the_pipeline_and_learns():
    """The hand-tuned script (pipeline/baselines/plain_tuned.py) reads the same windows as the pipeline's language
    model and trains: on a repeating token stream its loss falls from ln(vocab) towards 0."""
    import numpy as np

    from pipeline import tasks
    from pipeline.baselines import plain_tuned

    ids = np.tile(np.arange(12, dtype="int32"), 40)
    x, y = tasks.lm_windows(ids, 4, 5)
    pairs = list(plain_tuned.windows(ids, 4, 5))
    assert np.array_equal(np.concatenate([p[0] for p in pairs]), x)
    assert np.array_equal(np.concatenate([p[1] for p in pairs]), y)
    model = plain_tuned.build(12, units=16, layers=1, batch=4, steps=5)
    step = plain_tuned.train_step(model, learning_rate=1.0, clip=5.0)
    losses = [float(step(xb, yb)) / 5 for _ in range(6) for xb, yb in pairs]
    assert abs(losses[0] - math.log(12)) < 0.05 and losses[-1] < 0.2 * losses[0]
