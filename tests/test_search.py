"""Optuna searches (pipeline/sweep.py): the search space a sweep's parameters become, the sweep's identity, pruning
of a real (tiny) training run against a constructed study, and the expected-best curve (Dodge et al. 2019)."""

import math

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from scipy import stats

from pipeline import compare, objective, prepare, sweep, train

SMALL_DATA = ("data.n_train=128", "data.n_val=32", "data.n_test=64")


def test_sweep_parameters_split_into_search_space_grid_and_fixed_values():
    space, grid, fixed = sweep.search_space(
        [
            "model=rnn,gru",
            "optimizer.learning_rate=tag(log, interval(0.0001, 0.1))",
            "model.dropout=interval(0.0, 0.5)",
            "model.units=choice(32, 64)",
            "model.layers=int(interval(1, 3))",
            "trainer.batch_size=range(16, 65, 16)",
            "seed=3",
        ]
    )
    assert grid == [["model=rnn"], ["model=gru"]]  # a plain list: each value its own study, same trials
    assert fixed == ["seed=3"]
    assert space == {
        "optimizer.learning_rate": FloatDistribution(0.0001, 0.1, log=True),
        "model.dropout": FloatDistribution(0.0, 0.5),
        "model.units": CategoricalDistribution([32, 64]),
        "model.layers": IntDistribution(1, 3),
        "trainer.batch_size": IntDistribution(16, 64, step=16),
    }


def test_two_grid_lists_cross():
    _, grid, _ = sweep.search_space(["model=rnn,gru", "optimizer=adam,sgd"])
    assert len(grid) == 4 and ["model=gru", "optimizer=sgd"] in grid


def test_the_command_line_wins_over_a_search_presets_grid():
    space, grid, fixed = sweep.search_space(
        ["model=rnn,lstm,gru", "optimizer.learning_rate=interval(0.001, 0.1)", "model=gru"]
    )
    assert grid == [[]] and fixed == ["model=gru"] and list(space) == ["optimizer.learning_rate"]


def test_the_sweep_key_ignores_how_a_sweep_runs_but_not_what_it_runs():
    base = {"model": "rnn,gru", "seed": "1,2", "paths.root": "/x"}
    same = {**base, "sweep.resume": "true", "trainer.verbose": "0", "trainer.intra_op_threads": "1"}
    assert sweep.sweep_key(same) == sweep.sweep_key(base)
    assert sweep.sweep_key({**base, "seed": "1,2,3"}) != sweep.sweep_key(base)
    assert sweep.sweep_key({**base, "model.units": "8"}) != sweep.sweep_key(base)


def sweeper(n_trials: int = 4, n_jobs: int = 2) -> sweep.OptunaSweeper:
    sampler = OmegaConf.create({"kind": "random", "seed": 123, "startup_trials": 10})
    return sweep.OptunaSweeper("auto", n_trials, n_jobs, None, sampler, {})


def test_a_resumed_search_runs_its_running_trials_again_then_draws_what_an_uninterrupted_one_would():
    """A study stopped with trials 0, 1 done and 2 RUNNING: the next batch re-launches trial 2 under its number and
    params, then asks trial 3, which draws what trial 3 of an uninterrupted search drew."""
    space = {"optimizer.learning_rate": FloatDistribution(1e-4, 1e-1, log=True)}
    uninterrupted = optuna.create_study()
    for k in range(4):
        uninterrupted.sampler = sweep.make_sampler(sweeper().sampler, 123 + 7919 * k)
        trial = uninterrupted.ask(space)
        uninterrupted.tell(trial, 0.5)
    stopped = optuna.create_study()
    for k in range(3):
        stopped.sampler = sweep.make_sampler(sweeper().sampler, 123 + 7919 * k)
        trial = stopped.ask(space)
        if k < 2:
            stopped.tell(trial, 0.5)
    stale = [t for t in stopped.trials if t.state.name == "RUNNING"]
    batch = sweeper()._batch([(["model=gru"], stopped, stale)], space, ["seed=1"], 0)
    assert [number for _, number, _ in batch] == [2, 3]
    drawn = [t.params for t in uninterrupted.trials]
    for (_, number, overrides), params in zip(batch, drawn[2:], strict=True):
        value = params["optimizer.learning_rate"]
        assert overrides[:3] == ["seed=1", "model=gru", f"optimizer.learning_rate={value}"]
        assert overrides[3:] == [f"search.study='{stopped.study_name}'", f"search.trial={number}"]
    assert sweeper()._batch([(["model=gru"], stopped, [])], space, [], 0) == []  # 4 trials: the study is complete


def test_a_search_without_a_space_or_against_its_metric_is_refused(make_cfg):
    with pytest.raises(sweep.SweepError, match="needs a search space"):
        s = sweeper()
        s.config = make_cfg()
        s.sweep(["model=rnn,gru"])
    s = sweep.OptunaSweeper("maximize", 4, 2, None, sweeper().sampler, {})
    s.config = make_cfg("data=ptb")
    with pytest.raises(sweep.SweepError, match="the trials report val/perplexity: use minimize"):
        s.resolved_direction()
    s.direction = "auto"
    assert s.resolved_direction() == "minimize"
    with pytest.raises(sweep.SweepError, match="maximizes its objective, but this search should minimize"):
        sweep.check_direction(optuna.create_study(direction="maximize"), "minimize")


def test_the_best_objective_is_the_best_epoch():
    history = [{"val/accuracy": 0.6}, {"val/accuracy": 0.8}, {"val/accuracy": 0.7}]
    assert sweep.best_objective(history) == 0.8
    assert sweep.best_objective([{"val/perplexity": 150.0}, {"val/perplexity": 120.0}]) == 120.0
    assert math.isnan(sweep.best_objective([]))


# --- Pruning a real training run --------------------------------------------------------------------------------
def constructed_study(cfg, value: float, epochs: int) -> optuna.Study:
    """The study the config's search storage holds: four finished trials that reached ``value`` every epoch."""
    storage = sweep.open_storage(sweep.study_storage(cfg.search, cfg.tracking.uri))
    study = optuna.create_study(study_name="constructed", storage=storage, direction="maximize")
    for _ in range(4):
        study.add_trial(optuna.trial.create_trial(value=value, intermediate_values=dict.fromkeys(range(epochs), value)))
    return study


@pytest.fixture
def search_job(make_cfg, mlflow_store):
    """A toy dataset, and a function that trains one trial of the constructed study: (result, trial number)."""
    prepare.run(make_cfg(*SMALL_DATA))

    def run_trial(*overrides: str):
        cfg = make_cfg(*SMALL_DATA, "budget=smoke", "trainer.epochs=5", "tracking.log_model=false", *overrides)
        study = constructed_study(cfg, 0.99, 5)
        number = study.ask().number
        result = train.run(
            make_cfg(
                *SMALL_DATA,
                "budget=smoke",
                "trainer.epochs=5",
                "tracking.log_model=false",
                "search.study=constructed",
                f"search.trial={number}",
                *overrides,
            )
        )
        return result, study, number

    return run_trial


def test_a_trial_clearly_worse_than_the_median_is_pruned_and_marked_pruned_not_failed(search_job, tmp_path):
    result, study, number = search_job("optimizer.learning_rate=1e-9")  # stays at chance: far below 0.99
    assert result["pruned"] and train.objective(result) == sweep.PRUNED
    assert len(result["history"]) == 2  # epoch 1 is warm-up; at epoch 2 it is below the median and stops
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result["run_id"])
    assert run.info.status == "FINISHED"  # a pruned trial ended as planned: not FAILED, not KILLED
    tags = run.data.tags
    assert (tags["trial_state"], tags["pruned_after_epoch"], tags["trial"], tags["study"]) == (
        "PRUNED",
        "2",
        str(number),
        "constructed",
    )
    assert "test/accuracy" not in run.data.metrics  # stopped before the test evaluation
    assert study.trials[number].intermediate_values.keys() == {0, 1}  # what it reported, epoch by epoch
    assert not (tmp_path / "checkpoints" / result["run_id"]).exists()


def test_a_trial_at_its_last_epoch_is_never_pruned(search_job, tmp_path):
    result, study, number = search_job("optimizer.learning_rate=1e-9", "trainer.epochs=2")  # below it at epoch 2
    assert not result.get("pruned") and len(result["history"]) == 2
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result["run_id"])
    assert run.data.tags["trial_state"] == "COMPLETE" and "test/accuracy" in run.data.metrics


def test_without_a_pruner_the_same_trial_runs_every_epoch(search_job, tmp_path):
    result, study, number = search_job("optimizer.learning_rate=1e-9", "search.pruner=none")
    assert not result.get("pruned") and len(result["history"]) == 5
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result["run_id"])
    assert run.data.tags["trial_state"] == "COMPLETE" and "test/accuracy" in run.data.metrics
    assert len(study.trials[number].intermediate_values) == 5


# --- Expected best of n trials (Dodge et al. 2019) --------------------------------------------------------------
def test_the_expected_best_of_n_trials_is_the_order_statistic_formula():
    curve = compare.expected_best([0.5, 0.7, 0.9], higher=True)
    # E[max of n draws with replacement] = sum_i v_(i) ((i/N)^n - ((i-1)/N)^n)
    assert curve["expected"].tolist() == pytest.approx(
        [0.7, 0.5 / 9 + 0.7 * 3 / 9 + 0.9 * 5 / 9, 0.9 * 19 / 27 + 0.7 * 7 / 27 + 0.5 / 27]
    )
    lower = compare.expected_best([150.0, 120.0, 100.0], higher=False)  # perplexity: the best is the lowest
    assert lower["expected"].iloc[0] == pytest.approx(370 / 3) and lower["expected"].is_monotonic_decreasing


def test_the_expected_best_matches_simulated_draws_and_its_band_covers_it():
    values = np.random.default_rng(0).normal(0.8, 0.05, 12)
    curve = compare.expected_best(values, higher=True)
    rng = np.random.default_rng(1)
    for n in (1, 3, 12):
        simulated = rng.choice(values, size=(20000, n)).max(axis=1).mean()
        assert curve["expected"].iloc[n - 1] == pytest.approx(simulated, abs=0.002)
    assert (curve["low"] <= curve["expected"] + 1e-12).all() and (curve["expected"] <= curve["high"] + 1e-12).all()
    assert curve["expected"].is_monotonic_increasing and curve["expected"].iloc[-1] <= values.max()
    # the n=1 band is a bootstrap interval of the mean: close to the t-interval of 12 values
    t_low, t_high = stats.t.interval(0.95, 11, loc=values.mean(), scale=values.std(ddof=1) / math.sqrt(12))
    assert curve["low"].iloc[0] == pytest.approx(t_low, abs=0.01) and curve["high"].iloc[0] == pytest.approx(
        t_high, abs=0.01
    )


def test_the_best_trial_is_optunas_a_complete_one_and_the_first_of_a_tie():
    table = pd.DataFrame(
        {
            "study": ["s"] * 4,
            "cell": ["gru"] * 4,
            "trial": [0, 1, 2, 3],
            "state": ["COMPLETE", "PRUNED", "COMPLETE", "FAILED"],
            "best_val": [0.565, 0.85, 0.565, 0.99],  # a pruned trial's partial best is not a result
            "params.optimizer.learning_rate": ["0.1", "0.2", "0.3", "0.4"],
        }
    )
    row = compare.tuning_summary(table, objective.ACCURACY).iloc[0]
    assert (row["best_trial"], row["best_val"], row["pruned"], row["failed"]) == (0, 0.565, 1, 1)
