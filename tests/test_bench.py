"""The benchmark harness on the toy case: a real (tiny) run whose numbers must agree with each other, with a known
tracking cost injected so that the tracking overhead has a value to find."""

import json
import math
import os
import re
import time
from pathlib import Path

import ml_dtypes
import mlflow
import numpy as np
import pytest
from hydra import initialize_config_dir

from pipeline import bench, models, prepare, tracking
from tests.conftest import CONF, compose_config

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
        "bench.cases=[toy_lstm]",
        "bench.steps=10",
        "bench.rounds=3",
        "bench.pipeline_overheads=false",
        "bench.isa=[native]",  # this process only: the other classes and the whole runs have their own test
        "bench.whole_run_steps=0",
        top="bench",
    )
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        results = bench.run(cfg)
    (case,) = results["cases"]
    assert (case["case"], case["isa"], case["unit"], case["steps"]) == ("toy_lstm", "native", "samples", 10)
    assert case["precision"] == "float32" and "whole_run" not in case
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
    # The packages the figures depend on, as installed.
    assert results["stack"]["numpy"] == np.__version__ and results["stack"]["ml_dtypes"] == ml_dtypes.__version__
    assert table.splitlines()[2].endswith(f"ml_dtypes {ml_dtypes.__version__}, mlflow {mlflow.__version__}")


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


@pytest.mark.integration  # two bench processes, each timing three programs twice: a couple of minutes
def test_both_machine_classes_the_machine_rate_and_the_whole_runs_agree(make_cfg, tmp_path):
    prepare.run(make_cfg(top="prepare"))
    cfg = make_cfg(
        "bench.cases=[toy_lstm]",
        "bench.steps=5",
        "bench.rounds=2",
        "bench.isa=[native,avx2]",
        "bench.whole_run_steps=5",
        "bench.whole_run_repeats=2",
        "bench.whole_run_cases=[toy_lstm]",
        "bench.pipeline_overheads=false",
        top="bench",
    )
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        results = bench.run(cfg)
    native, avx2 = results["cases"]
    assert (native["case"], native["isa"], avx2["case"], avx2["isa"]) == ("toy_lstm", "native", "toy_lstm", "avx2")
    assert results["classes"]["avx2"]["cpu_bf16"] is None  # the emulated CPU has no bfloat16: auto = float32
    assert results["classes"]["avx2"]["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert "--xla_cpu_max_isa=AVX2" in results["classes"]["avx2"]["env"]["XLA_FLAGS"]
    for case in (native, avx2):  # the limit at the machine's rate: the same units over the same time
        fraction = case["pipeline_per_sec"] / case["limit_at_machine_rate_per_sec"]
        assert agrees(case["fraction_of_machine_limit"], fraction, rel=0.01), case["isa"]
        assert 0 < case["fraction_of_machine_limit"] < 1.2 and case["machine_gflop_per_sec"] > 0
    for runs in (native["whole_run"], avx2["whole_run"]):  # each class times its whole runs under its own caps
        assert set(runs["programs"]) == {"pipeline", "pipeline_compiling", "plain_fit"}  # toy: no plain_tuned
        assert (runs["steps"], runs["repeats"], runs["units"]) == (5, 2, 5 * native["batch"])
        for program, p in runs["programs"].items():
            assert p["seconds_min"] <= p["seconds_median"] <= p["seconds_max"], program
            assert agrees(p["per_sec"] * p["seconds_median"], runs["units"], rel=0.01), program
        for program, key in (("pipeline", "over"), ("pipeline_compiling", "compiling_over")):
            ratio = runs["programs"][program]["per_sec"] / runs["programs"]["plain_fit"]["per_sec"]
            assert agrees(runs[f"whole_run_ratio_{key}_fastest_baseline"], ratio, rel=0.01), program
    written = json.loads((tmp_path / "reports/bench.json").read_text())
    assert [c["isa"] for c in written["cases"]] == ["native", "avx2"]  # the child's own report never replaced it
    table = (tmp_path / "reports/bench.md").read_text()
    assert "| toy_lstm | avx2 " in table and "| toy_lstm | native | plain_fit " in table
    assert re.search(r"\| toy_lstm \| avx2 +\| pipeline_compiling ", table)  # the avx2 class's whole runs


FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"


@pytest.mark.parametrize(
    ("cap", "expected"),
    [
        (None, "amx_bf16"),  # no cap: the machine's best
        ("AVX2", None),  # the bench's emulated class
        ("avx512_core_vnni", None),  # oneDNN reads the name in any case
        ("SSE41", None),
        ("AVX512_CORE_BF16", "avx512_bf16"),  # bfloat16 without AMX
        ("AVX512_CORE_AMX", "amx_bf16"),
        ("ALL", "amx_bf16"),
    ],
)
def test_bf16_instructions_stop_where_onednn_max_cpu_isa_stops(tmp_path, monkeypatch, cap, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(FLAGS)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert models.cpu_bf16_matmul(cpuinfo) == expected


def test_auto_precision_is_float32_on_the_emulated_avx2_cpu(monkeypatch):
    monkeypatch.setattr(models, "cpu_flag_set", lambda path: frozenset(FLAGS.split()))
    monkeypatch.setattr(models, "gpu_available", lambda: False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert models.resolve_precision("auto") == "bfloat16_grad"
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    for key, value in bench.emulated_env("avx2").items():
        monkeypatch.setenv(key, value)
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_cpu_max_isa=AVX2"  # kept, then capped
    assert models.resolve_precision("auto") == "float32"


def test_whole_run_cases_null_means_every_case_and_empty_means_none(tmp_path):
    cases = "bench.cases=[toy_lstm,imdb_lstm]"
    names = {
        setting: bench.whole_run_names(compose_config([cases, *setting], config_name="bench"))
        for setting in ((), ("bench.whole_run_cases=null",), ("bench.whole_run_cases=[]",),
                        ("bench.whole_run_cases=[imdb_lstm]",), ("bench.whole_run_steps=0",
                                                                "bench.whole_run_cases=null"))
    }  # fmt: skip
    assert list(names.values()) == [[], ["toy_lstm", "imdb_lstm"], [], ["imdb_lstm"], []]


def test_whole_run_commands_give_every_program_the_same_preset_and_steps(tmp_path):
    cfg = compose_config([f"paths.root={tmp_path}", "bench.whole_run_steps=7"], config_name="bench")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        toy = bench.whole_run_commands(cfg, "toy_lstm", tmp_path / "store")
        ptb = bench.whole_run_commands(cfg, "ptb_small_lstm_float32", tmp_path / "store")
    assert set(toy) == {"pipeline", "pipeline_compiling", "plain_fit"}
    assert set(ptb) == {"pipeline", "pipeline_compiling", "plain_fit", "plain_tuned"}
    for commands, preset in ((toy, "toy_dynamic"), (ptb, "ptb_small")):
        pipeline, fit = commands["pipeline"], commands["plain_fit"]
        assert commands["pipeline_compiling"] == [*pipeline[:-1], "trainer.compile_cache=null", pipeline[-1]]
        assert pipeline[1:3] == ["-m", "pipeline.train"] and fit[1:3] == ["-m", "pipeline.baselines.plain_fit"]
        assert fit[3:] == [arg for arg in pipeline[3:] if not arg.startswith("hydra.")]  # one list of overrides
        assert {f"experiment={preset}", "trainer.max_steps_per_epoch=7", "trainer.epochs=1"} <= set(fit)
    assert "trainer.precision=float32" in ptb["plain_fit"]
    assert ptb["plain_tuned"][2:] == [
        *("pipeline.baselines.plain_tuned", str(tmp_path / "data/prepared/ptb"), "--steps", "7"),
        *("--units", "200", "--layers", "2", "--batch", "20", "--window", "20"),  # ptb_small's shapes
    ]
