"""Text generation: the sampling rules on hand-made logits, then from a model logged to MLflow."""

import logging

import numpy as np
import pytest

from pipeline import generate, train
from tests.conftest import compose_config
from tests.test_lm import tiny_ptb  # noqa: F401 (fixture)

LOGITS = np.log(np.array([0.1, 0.6, 0.3]))


def test_greedy_takes_the_likeliest_word():
    assert generate.next_word(LOGITS, "greedy", 1.0, 0, np.random.default_rng(0)) == 1


def test_sampling_is_seeded_and_follows_the_distribution():
    draws = [generate.next_word(LOGITS, "sample", 1.0, 0, np.random.default_rng(s)) for s in range(2000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.1, 0.6, 0.3], atol=0.04)
    again = [generate.next_word(LOGITS, "sample", 1.0, 0, np.random.default_rng(s)) for s in range(50)]
    assert again == draws[:50]


def test_top_k_and_temperature():
    rng = np.random.default_rng(0)
    assert {generate.next_word(LOGITS, "sample", 1.0, 1, rng) for _ in range(50)} == {1}  # top-1 is greedy
    assert {generate.next_word(LOGITS, "sample", 1.0, 2, rng) for _ in range(200)} == {1, 2}  # word 0 cut
    cold = [generate.next_word(LOGITS, "sample", 0.05, 0, rng) for _ in range(200)]
    assert cold.count(1) >= 198  # a low temperature is nearly greedy
    with pytest.raises(ValueError, match="unknown strategy 'beam'"):
        generate.next_word(LOGITS, "beam", 1.0, 0, rng)


def test_generate_from_an_mlflow_run(tiny_ptb, tmp_path, caplog):  # noqa: F811
    result = train.run(tiny_ptb())
    cfg = compose_config([f"paths.root={tmp_path}"], config_name="generate")
    cfg.run_id = result["run_id"]
    cfg.strategy, cfg.words = "greedy", 7
    assert generate.run(cfg) == "the company said w0 w1 w2 <eos> the company said"
    # By model URI too, sampled and seeded; an unknown prime word becomes <unk> with a warning, not a crash.
    cfg.run_id, cfg.model_uri = None, result["model_uri"]
    cfg.strategy, cfg.prime, cfg.seed = "sample", "the zebra said", 3
    with caplog.at_level(logging.WARNING):
        first = generate.run(cfg)
    assert "zebra" in caplog.text and "<unk>" in caplog.text
    assert first.startswith("the zebra said ") and len(first.split()) == 3 + 7
    assert generate.run(cfg) == first
