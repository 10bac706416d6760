"""The benchmark harness on the toy case: it measures both paths and writes its files."""

import json
from pathlib import Path

import pytest
from hydra import initialize_config_dir

from pipeline import bench, prepare
from tests.conftest import CONF


def test_bench_writes_throughput_ratio_and_overheads(make_cfg, tmp_path):
    prepare.run(make_cfg())
    cfg = make_cfg("bench.cases=[toy_lstm]", "bench.steps=3", "bench.rounds=2", "bench.pipeline_overheads=false")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        results = bench.run(cfg)
    (case,) = results["cases"]
    assert case["case"] == "toy_lstm" and case["unit"] == "samples" and case["steps"] == 3
    assert case["pipeline_per_sec"] > 0 and case["keras_per_sec"] > 0 and case["keras_steady_per_sec"] > 0
    assert case["tracking_overhead_pct"] >= 0 and case["precision"] == "float32"
    assert results["cpu"] and results["cpu_bf16"] in (None, "amx_bf16", "avx512_bf16")
    assert case["ratio_pipeline_over_keras"] == round(case["pipeline_per_sec"] / case["keras_per_sec"], 3) or (
        abs(case["ratio_pipeline_over_keras"] - case["pipeline_per_sec"] / case["keras_per_sec"]) < 0.01
    )
    assert json.loads((tmp_path / "reports/bench.json").read_text())["cases"][0]["case"] == "toy_lstm"
    assert "| toy_lstm " in (tmp_path / "reports/bench.md").read_text()


def test_an_unknown_case_is_named_with_the_known_ones(make_cfg):
    cfg = make_cfg("bench.cases=[toy_lstm,ptb_tiny]")
    with pytest.raises(ValueError, match=r"unknown case 'ptb_tiny'; choose from toy_lstm, ptb_small_lstm, "):
        bench.run(cfg)
    assert not (Path(cfg.paths.reports) / "bench.json").exists()  # nothing ran
