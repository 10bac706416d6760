"""One rule for which metric judges a run and which way is better, read the same way by every caller."""

import math

import pandas as pd
import pytest

from pipeline import objective


def test_a_task_kind_picks_its_metric_and_direction():
    lm, clf = objective.for_kind("language_model"), objective.for_kind("classification")
    assert (lm.val, lm.test, lm.direction) == ("val/perplexity", "test/perplexity", "minimize")
    assert (clf.val, clf.test, clf.direction) == ("val/accuracy", "test/accuracy", "maximize")
    with pytest.raises(ValueError, match="no objective for task kind 'ranking'; known kinds: language_model"):
        objective.for_kind("ranking")


def test_the_best_epoch_skips_diverged_epochs():
    history = [{"val/perplexity": 150.0}, {"val/perplexity": math.inf}, {"val/perplexity": 120.0}]
    assert objective.of_metrics(history[0]).best_epoch(history) == 120.0
    assert objective.ACCURACY.best_epoch([{"val/accuracy": 0.7}, {"val/accuracy": 0.8}]) == 0.8
    assert math.isnan(objective.ACCURACY.best_epoch([]))
    assert objective.of_metric("test/accuracy").higher and not objective.of_metric("val/perplexity").higher


def test_runs_and_curves_name_their_objective():
    lm_runs = pd.DataFrame({"metrics.val/perplexity": [110.0, None], "metrics.val/accuracy": [None, None]})
    assert objective.of_runs(lm_runs) is objective.PERPLEXITY
    assert objective.of_runs(pd.DataFrame({"metrics.test/accuracy": [0.9]})) is objective.ACCURACY
    curves = pd.DataFrame({"run_id": ["a", "a", "b"], "key": ["val/perplexity"] * 3, "value": [130.0, 118.0, 125.0]})
    assert objective.of_curves(curves) is objective.PERPLEXITY
    assert objective.PERPLEXITY.best_val(curves).to_dict() == {"a": 118.0, "b": 125.0}
