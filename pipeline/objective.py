"""Which metric judges a run, whether higher is better, and how to read a run's best epoch: decided here only.

A task's kind picks its objective (a language model is judged on perplexity, a classifier on accuracy, a regression
on mean squared error, a per-step tagger on cross-entropy); the comparison tables, the report, a sweep's result, the
Optuna sweeper's direction and its pruner all ask this module.
"Best epoch" is the best validation value over a run's epochs: the model early stopping would keep, and the only
fair way to choose between runs (choosing on test would select on the test set).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pandas as pd


@dataclass(frozen=True)
class Objective:
    """A task's metric (logged as ``val/<metric>`` and ``test/<metric>``) and its direction."""

    metric: str
    higher: bool
    digits: int = field(default=2, compare=False)  # decimals in the report's tables: enough to tell seeds apart
    headline_digits: int = field(default=1, compare=False)  # decimals in the one-sentence headline

    @property
    def test(self) -> str:
        return f"test/{self.metric}"

    @property
    def val(self) -> str:
        return f"val/{self.metric}"

    @property
    def direction(self) -> str:
        """Optuna's name for the direction."""
        return "maximize" if self.higher else "minimize"

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher else a < b

    def best(self, values: Iterable[float]) -> float:
        """The best of ``values``, NaN and infinities (a diverged epoch) aside; NaN when none is left."""
        finite = [float(v) for v in values if v is not None and math.isfinite(v)]
        return (max if self.higher else min)(finite) if finite else math.nan

    def best_epoch(self, history: Iterable[Mapping[str, float]]) -> float:
        """A run's result: its best epoch's validation value (``history``: one metrics dict per epoch)."""
        return self.best(h[self.val] for h in history if self.val in h)

    def best_val(self, curves: pd.DataFrame) -> pd.Series:
        """Each run's best validation value, by run id (``curves``: rows of run_id, key, value)."""
        val = curves[curves["key"] == self.val].groupby("run_id")["value"]
        return val.max() if self.higher else val.min()


ACCURACY = Objective("accuracy", higher=True, digits=4, headline_digits=3)
PERPLEXITY = Objective("perplexity", higher=False)
# Mean squared error: a regression (the adding problem), whose solved runs score 0.0003 against a baseline of 0.167
MSE = Objective("mse", higher=False, digits=4, headline_digits=4)
# Mean per-step cross-entropy: the copy task's measure, a few hundredths around its baseline of 0.173
CROSS_ENTROPY = Objective("cross_entropy", higher=False, digits=4, headline_digits=3)
# A dataset's kind -> how it is judged. The order matters to ``of_metrics``: a tagger also logs accuracy, and its
# objective is its cross-entropy, so it comes before the classifier.
BY_KIND = {"language_model": PERPLEXITY, "regression": MSE, "tagging": CROSS_ENTROPY, "classification": ACCURACY}


def for_kind(kind: str) -> Objective:
    if kind not in BY_KIND:
        raise ValueError(f"no objective for task kind {kind!r}; known kinds: {', '.join(BY_KIND)}")
    return BY_KIND[kind]


def of_metric(name: str) -> Objective:
    """The objective a metric name (``test/accuracy``, ``val/perplexity``) belongs to."""
    metric = name.rpartition("/")[2]
    return next((o for o in BY_KIND.values() if o.metric == metric), Objective(metric, higher=True))


def of_metrics(names: Iterable[str]) -> Objective:
    """The objective of a run from the names of the metrics it logged (a pruned trial logged no test metric)."""
    present = set(names)
    return next((o for o in BY_KIND.values() if {o.val, o.test} & present), ACCURACY)


def of_runs(runs: pd.DataFrame) -> Objective:
    """The objective of runs read from MLflow (``metrics.<name>`` columns that hold a value)."""
    logged = [c.removeprefix("metrics.") for c in runs.columns if c.startswith("metrics.") and runs[c].notna().any()]
    return of_metrics(logged)


def of_curves(curves: pd.DataFrame) -> Objective:
    """The objective of runs from their metric histories (rows of run_id, key, value)."""
    return of_metrics(curves["key"].unique())
