"""Statistics over seeds with known answers: aggregation, intervals, the significance verdicts, grouping by
config_id, anchors, cross-dataset ranks; capacity-matched sizing; ``seeds=N``."""

import math

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline import compare, config, models, objective, report, sweep, tracking
from tests.conftest import CONF, compose_config

T_975 = {2: 4.302652729911275, 4: 2.7764451051977987}  # Student's t, 97.5% quantile, by degrees of freedom
ACC = objective.ACCURACY


def test_interval_of_known_values():
    got = compare.interval([1, 2, 3, 4, 5])
    half = T_975[4] * math.sqrt(2.5) / math.sqrt(5)
    assert got["n"] == 5 and got["mean"] == 3 and got["std"] == pytest.approx(math.sqrt(2.5))
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((3 - half, 3 + half))
    one = compare.interval([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["std"]) and math.isnan(one["ci_low"])
    assert compare.interval([0.5, 0.5, 0.5])["ci_low"] == 0.5  # no spread: a point, not NaN


# --- A store of constructed runs ------------------------------------------------------------------------------------
def add_run(client, exp, config_id, seed, test, val_curve, cell="lstm", lr=0.01, tagged=True):
    tags = {"dataset": "toy", "cell": cell, "seed": str(seed), "params_count": "100"}
    if tagged:
        tags["config_id"] = config_id
    run = client.create_run(exp, tags=tags)
    rid = run.info.run_id
    for key, value in {"seed": seed, "model.cell": cell, "optimizer.learning_rate": lr}.items():
        client.log_param(rid, key, value)
    for step, value in enumerate(val_curve):
        client.log_metric(rid, "val/accuracy", value, step=step)
        client.log_metric(rid, "perf/epoch_seconds", 2.0, step=step)
    client.log_metric(rid, "test/accuracy", test)
    client.set_terminated(rid, "FINISHED")
    return rid


def aggregate_store(uri):
    runs = tracking.finished_runs(uri, "%")
    curves = tracking.metric_histories(uri, list(runs["run_id"]), ["val/accuracy", "perf/epoch_seconds"])
    per_run = compare.per_run(runs, curves, ACC)
    return per_run, compare.aggregate(per_run, ACC)


@pytest.fixture
def store(mlflow_store):
    client = MlflowClient(mlflow_store)
    return mlflow_store, client, client.create_experiment("toy")


def test_aggregation_gives_exact_means_stds_intervals_and_a_paired_verdict(store):
    uri, client, exp = store
    for seed, (a, b) in enumerate([(0.80, 0.70), (0.82, 0.71), (0.84, 0.72)], start=1):
        add_run(client, exp, "A", seed, a, [0.5, a + 0.01, a])  # best validation = epoch 2
        add_run(client, exp, "B", seed, b, [0.5, b], cell="rnn")
    _, table = aggregate_store(uri)
    assert list(table["config_id"]) == ["A", "B"] and list(table["label"]) == ["LSTM", "SimpleRNN"]
    a = table.iloc[0]
    half = T_975[2] * 0.02 / math.sqrt(3)
    assert (a["n"], a["seeds"], a["test_mean"], a["test_std"]) == (3, "1,2,3", pytest.approx(0.82), pytest.approx(0.02))
    assert (a["test_ci_low"], a["test_ci_high"]) == pytest.approx((0.82 - half, 0.82 + half))
    assert a["val_mean"] == pytest.approx(0.83) and a["s_per_epoch"] == 2.0
    # Paired differences 0.10, 0.11, 0.12: t = 0.11 / (0.01 / sqrt 3) with 2 degrees of freedom.
    p = 2 * (1 - __import__("scipy").stats.t.cdf(0.11 / (0.01 / math.sqrt(3)), 2))
    assert table.iloc[1]["p"] == pytest.approx(p) and table.iloc[1]["test"] == "paired"
    assert table.iloc[1]["verdict"] == f"worse ({compare.p_text(p)})" and a["verdict"] == "best"
    # The difference B - A with its paired 95% interval: -0.11 +- t(0.975, 2) * 0.01 / sqrt 3.
    b, half = table.iloc[1], T_975[2] * 0.01 / math.sqrt(3)
    assert (b["diff_mean"], b["diff_ci_low"], b["diff_ci_high"]) == pytest.approx((-0.11, -0.11 - half, -0.11 + half))
    assert (a["diff_mean"], a["diff_ci_low"], a["diff_ci_high"]) == (0.0, 0.0, 0.0)
    assert list(report.shown(table, ACC)["difference [95% CI]"]) == [
        "",
        f"-0.1100 [{-0.11 - half:+.4f}, {-0.11 + half:+.4f}]",
    ]
    line = compare.headline("toy", table, ACC)
    assert line.startswith("toy, 3 seeds each (test accuracy, mean ± std): LSTM 0.820 ± 0.020 is best")
    assert "SimpleRNN is worse by 0.110 (p = 0.003)" in line


def test_two_draws_of_one_distribution_are_not_distinguishable_and_separated_groups_are(store):
    uri, client, exp = store
    rng = np.random.default_rng(7)
    same = rng.normal(0.80, 0.02, size=(2, 5))
    far = rng.normal(0.60, 0.02, size=5)
    for seed in range(5):
        for cid, value in [("A", same[0, seed]), ("B", same[1, seed]), ("C", far[seed])]:
            add_run(client, exp, cid, seed + 1, value, [value], cell={"A": "lstm", "B": "gru", "C": "rnn"}[cid])
    _, table = aggregate_store(uri)
    verdicts = dict(zip(table["config_id"], table["verdict"], strict=True))
    assert table["config_id"].iloc[-1] == "C" and verdicts["C"].startswith("worse (p")
    other = "B" if table["config_id"].iloc[0] == "A" else "A"
    assert verdicts[other].startswith("not distinguishable from best (p = ")
    assert table.set_index("config_id").loc[other, "p"] > 0.05


def test_rows_group_by_config_id_and_never_mix_configurations(store):
    uri, client, exp = store
    for seed in (1, 2, 3):
        add_run(client, exp, "lr-small", seed, 0.8, [0.8], lr=0.01)
        add_run(client, exp, "lr-big", seed, 0.7, [0.7], lr=0.1)
    add_run(client, exp, "lr-small", 1, 0.9, [0.9], lr=0.01)  # the same seed again: its newest run counts
    for seed in (1, 2):  # older runs without the tag group by their params (less the seed)
        add_run(client, exp, None, seed, 0.5, [0.5], lr=0.3, tagged=False)
    per_run, table = aggregate_store(uri)
    assert len(table) == 3 and sorted(table["n"]) == [2, 3, 3]
    small = table.set_index("config_id").loc["lr-small"]
    assert small["test_mean"] == pytest.approx((0.9 + 0.8 + 0.8) / 3) and small["optimizer.learning_rate"] == "0.01"
    for _, group in per_run.groupby("config_id"):
        assert group["params.optimizer.learning_rate"].nunique() == 1  # one configuration per row
    assert set(table["label"]) == {"LSTM learning_rate=0.01", "LSTM learning_rate=0.1", "LSTM learning_rate=0.3"}
    assert table.set_index("n").loc[2, "verdict"] == "needs >= 3 seeds"


def test_a_label_names_each_varying_setting_once():
    row = pd.Series({"cell": "lstm", "params.precision": "float32", "params.trainer.precision": "float32"})
    assert compare.label(row, ["params.precision", "params.trainer.precision"]) == "LSTM precision=float32"
    row["params.trainer.precision"] = "auto"  # requested auto, resolved float32: both, the second one in full
    assert compare.label(row, ["params.precision", "params.trainer.precision"]) == (
        "LSTM precision=float32, trainer.precision=auto"
    )
    row = pd.Series({"cell": "gru", "params.model.units": 149, "params.model.param_budget": 81674})
    assert compare.label(row, ["params.model.param_budget", "params.model.units"]) == "GRU units=149"


def test_cells_that_share_a_name_are_told_apart_by_their_paths_and_an_unimportable_one_keeps_its_name(store):
    uri, client, exp = store
    for seed in (1, 2, 3):  # two own cells both called Cell (neither importable here) and Keras' LSTM by path
        add_run(client, exp, "a", seed, 0.8, [0.8], cell="cella:Cell")
        add_run(client, exp, "b", seed, 0.6, [0.6], cell="cellb:Cell")
        add_run(client, exp, "k", seed, 0.7, [0.7], cell="keras.layers:LSTM")
        add_run(client, exp, "l", seed, 0.7, [0.7], cell="lstm")
        add_run(client, exp, "n", seed, 0.5, [0.5], cell="nowhere_module:Leaky")
    table = aggregate_store(uri)[1].set_index("config_id")
    assert table["label"].to_dict() == {
        "a": "cella:Cell", "b": "cellb:Cell", "k": "keras.layers:LSTM", "l": "LSTM", "n": "Leaky"
    }  # fmt: skip


def test_two_code_versions_of_an_own_cell_are_two_labelled_rows_and_a_bi_module_is_not_bidirectional(store):
    uri, client, exp = store
    for seed in (1, 2, 3):
        for config_id, code in (("old", "aaaa1111"), ("new", "bbbb2222")):
            rid = add_run(client, exp, config_id, seed, 0.8, [0.8], cell="bio_cells:Cell")
            client.set_tag(rid, "cell_code", code)
            client.log_param(rid, "model.bidirectional", "False")
        client.log_param(add_run(client, exp, "lstm", seed, 0.7, [0.7]), "model.bidirectional", "False")
    table = aggregate_store(uri)[1].set_index("config_id")
    assert table["label"].to_dict() == {
        "old": "Cell cell_code=aaaa1111", "new": "Cell cell_code=bbbb2222", "lstm": "LSTM"
    }  # fmt: skip


def test_runs_of_one_config_on_two_data_versions_are_labelled_by_their_data(store):
    uri, client, exp = store
    for seed in (1, 2, 3):
        for config_id, digest in (("v1", "1111aaaa" * 8), ("v2", "2222bbbb" * 8)):
            client.set_tag(add_run(client, exp, config_id, seed, 0.8, [0.8], cell="rnn"), "data_digest", digest)
        client.set_tag(add_run(client, exp, "gru", seed, 0.7, [0.7], cell="gru"), "data_digest", "1111aaaa" * 8)
    table = aggregate_store(uri)[1].set_index("config_id")
    assert table["label"].to_dict() == {"v1": "SimpleRNN data=1111aaaa", "v2": "SimpleRNN data=2222bbbb", "gru": "GRU"}


def test_an_anchor_row_of_one_config_is_comparable_when_one_of_its_runs_is_the_plain_preset():
    runs = pd.DataFrame(
        {
            "config_id": ["a"] * 3,
            "test": [0.97, 0.98, 0.99],
            "best_val": [0.97, 0.98, 0.99],
            "tags.preset": ["mnist_lstm"] * 3,
            "tags.anchor.metric": ["test/accuracy"] * 3,
            "tags.anchor.value": ["0.98"] * 3,
            "tags.anchor.source": ["seed"] * 3,
            "tags.preset_changes": [None, None, "model=lstm"],  # the same config: the override changed nothing
        }
    )
    assert compare.anchors(runs)["verdict"].tolist() == ["reproduced"]


def test_fewer_than_three_seeds_ask_for_more_instead_of_a_p_value(store):
    uri, client, exp = store
    for seed in (1, 2):
        add_run(client, exp, "A", seed, 0.8, [0.8])
        add_run(client, exp, "B", seed, 0.6, [0.6], cell="gru")
    _, table = aggregate_store(uri)
    assert list(table["verdict"]) == ["best", "needs >= 3 seeds"] and math.isnan(table["p"].iloc[1])
    assert "run at least 3 seeds to compare" in compare.headline("toy", table, ACC)


def test_a_stray_run_of_one_seed_best_on_validation_does_not_become_the_best(store):
    uri, client, exp = store
    for seed in (1, 2, 3):
        add_run(client, exp, "A", seed, 0.8, [0.8])
        add_run(client, exp, "B", seed, 0.6 + seed / 100, [0.6], cell="gru")
    add_run(client, exp, "stray", 1, 0.9, [0.95], cell="rnn")
    table = aggregate_store(uri)[1]
    assert list(table["config_id"]) == ["A", "B", "stray"]
    assert table["verdict"].iloc[1].startswith("worse (p = ") and table["verdict"].iloc[2] == "needs >= 3 seeds"
    difference = report.shown(table, ACC)["difference [95% CI]"].tolist()
    assert difference[0] == "" and difference[1].startswith("-0.1") and difference[2] == "–"  # no test: no numbers


def test_the_verdict_follows_the_paired_difference_and_a_seed_without_a_test_metric_drops_out():
    runs = pd.DataFrame(
        {
            "config_id": ["best"] * 3 + ["more"] * 5 + ["nan"] * 4,
            "seed": [1, 2, 3, 1, 2, 3, 4, 5, 1, 2, 3, 4],
            "test": [0.80, 0.81, 0.82, 0.811, 0.822, 0.830, 0.60, 0.61, 0.70, 0.71, math.nan, 0.69],
        }
    )
    p, how, (diff, low, high) = compare.compare_pair(runs, "more", "best")  # seeds 4, 5 have no partner
    assert how == "paired" and diff == pytest.approx(0.011) and low > 0  # better on the seeds both ran
    table = pd.DataFrame({"config_id": ["best", "more", "nan"], "test_mean": [0.81, 0.735, 0.70]})
    verdicts = compare.judge(runs, table, ACC)["verdict"].tolist()
    assert verdicts[1].startswith("better on test (p") and verdicts[2].startswith("worse (p")


def test_seeds_that_do_not_match_compare_by_welch_with_its_interval():
    runs = pd.DataFrame({"config_id": ["a"] * 3 + ["b"] * 3, "seed": [1, 2, 3, 4, 5, 6], "test": [1, 2, 3, 2, 4, 6.0]})
    p, how, (diff, low, high) = compare.compare_pair(runs, "a", "b")
    va, vb = 1.0 / 3, 4.0 / 3  # variances of the means: 1/3 and 4/3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)  # Welch-Satterthwaite
    half = __import__("scipy").stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert how == "Welch" and diff == -2.0 and (low, high) == pytest.approx((-2.0 - half, -2.0 + half))
    assert 0.05 < p < 1


def test_anchor_rows_say_reproduced_better_or_worse():
    runs = pd.DataFrame(
        {
            "config_id": ["a"] * 3 + ["b"] * 3,
            "test": [0.97, 0.98, 0.99, 0.80, 0.81, 0.82],
            "best_val": [0.97, 0.98, 0.99, 0.80, 0.81, 0.82],
            "tags.preset": ["mnist_lstm"] * 3 + ["imdb_rnn"] * 3,
            "tags.anchor.metric": ["test/accuracy"] * 6,
            "tags.anchor.value": ["0.98"] * 3 + ["0.78"] * 3,
            "tags.anchor.source": ["seed"] * 6,
        }
    )
    table = compare.anchors(runs).set_index("preset")
    assert table.loc["mnist_lstm", "verdict"] == "reproduced" and table.loc["mnist_lstm", "ours"] == pytest.approx(0.98)
    assert table.loc["imdb_rnn", "verdict"] == "better" and table.loc["imdb_rnn", "gap"] == pytest.approx(0.03)
    runs["tags.preset_changes"] = ["model=gru"] * 3 + ["trainer.epochs=2"] * 3
    table = compare.anchors(runs).set_index("preset")
    assert table.loc["mnist_lstm", "verdict"] == "not comparable: the preset with model=gru"
    assert table.loc["imdb_rnn", "verdict"] == "better (at trainer.epochs=2)"


def test_preset_changes_are_the_overrides_that_change_what_it_trains():
    overrides = ["experiment=ptb_small", "seed=3", "+model.cell=my:Cell", "trainer.epochs=2", "trainer.resume=true"]
    overrides += ["tracking.sweep_name=x", "budget=smoke", "optimizer=adam", "data.n_train=10", "anchor.value=1"]
    changes = config.preset_changes(overrides)
    assert changes == ["model.cell=my:Cell", "trainer.epochs=2", "budget=smoke", "optimizer=adam", "data.n_train=10"]
    assert config.only_budget(["trainer.epochs=2", "budget=smoke"]) and not config.only_budget(changes)


def test_a_hydra_job_tags_its_preset_and_what_its_command_line_changed():
    from hydra.core.hydra_config import HydraConfig

    from pipeline.tracking import runs

    cfg = compose_config(["experiment=imdb_lstm", "model=gru", "seed=2", "trainer.verbose=0"], hydra=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert (runs.preset_name(), runs.preset_overrides()) == ("imdb_lstm", ["model=gru"])
    finally:
        HydraConfig.instance().cfg = None


def test_cells_are_ranked_across_datasets_with_a_friedman_test():
    def table(values):
        return pd.DataFrame({"label": list(values), "test_mean": list(values.values())})

    tables = {  # GRU best everywhere, SimpleRNN worst everywhere
        "toy": table({"GRU": 0.99, "LSTM": 0.98, "SimpleRNN": 0.90}),
        "mnist": table({"GRU": 0.985, "LSTM": 0.98, "SimpleRNN": 0.95}),
        "imdb": table({"LSTM": 0.84, "GRU": 0.85, "SimpleRNN": 0.70}),
        "ptb": table({"GRU": 120.0, "LSTM": 125.0, "SimpleRNN": 150.0}),
        "imdb_long": table({"LSTM": 0.88}),  # one cell: left out, not a reason to drop the others
    }
    objectives = {
        "toy": ACC,
        "mnist": ACC,
        "imdb": ACC,
        "imdb_long": ACC,
        "ptb": compare.Objective("perplexity", False),
    }
    ranked = compare.cell_ranks(tables, objectives)
    assert ranked["average"].to_dict() == {"GRU": 1.0, "LSTM": 2.0, "SimpleRNN": 3.0}
    assert ranked["friedman_statistic"] == pytest.approx(8.0) and ranked["friedman_p"] == pytest.approx(math.exp(-4))
    assert ranked["nemenyi"].shape == (3, 3)
    assert compare.cell_ranks(dict(list(tables.items())[:2]), objectives) is None  # 2 datasets: no ranking


# --- Capacity-matched cells ------------------------------------------------------------------------------------------
METAS = {
    "toy": {"name": "toy", "kind": "classification", "input": "dense", "features": 1, "pad_value": -1.0,
            "num_classes": 2},
    "mnist": {"name": "mnist", "kind": "classification", "input": "dense", "features": 28, "pad_value": None,
              "num_classes": 10},
    "imdb": {"name": "imdb", "kind": "classification", "input": "tokens", "vocab_size": 10000, "num_classes": 2},
    "ptb": {"name": "ptb", "kind": "language_model", "input": "tokens", "vocab_size": 10000},
}  # fmt: skip
MATCHED = {"toy": "toy_dynamic", "mnist": "mnist_lstm", "imdb": "imdb_lstm", "ptb": "ptb_quick"}


@pytest.mark.parametrize("dataset", sorted(MATCHED))
def test_each_matched_sweep_budget_is_its_presets_lstm(dataset):
    cfg = compose_config([f"experiment={MATCHED[dataset]}"])
    budget = OmegaConf.load(CONF / "sweep" / f"cells_{dataset}_matched.yaml").model.param_budget
    assert models.count_params(cfg.model, METAS[dataset], cfg.model.units) == budget


def sizing_cases(datasets):
    return [
        pytest.param(ds, cell, layers, bi, id=f"{ds}-{'bi' if bi else ''}{cell}-{layers}")
        for ds in datasets
        for cell in ("rnn", "lstm", "gru")
        for layers in (1, 2)
        for bi in (False, True)
        if not (bi and METAS[ds]["kind"] == "language_model")
    ]


def check_sizing(dataset, cell, layers, bi):
    base = compose_config([f"experiment={MATCHED[dataset]}"]).model
    budget = OmegaConf.load(CONF / "sweep" / f"cells_{dataset}_matched.yaml").model.param_budget
    cfg = OmegaConf.merge(base, {"cell": cell, "layers": layers, "bidirectional": bi})
    units, count = models.units_for_budget(cfg, METAS[dataset], budget)
    assert count == models.count_params(cfg, METAS[dataset], units)  # what the factory builds
    neighbours = [models.count_params(cfg, METAS[dataset], u) for u in (units - 1, units + 1) if u >= 1]
    assert abs(count - budget) <= 0.02 * budget or all(abs(n - budget) >= abs(count - budget) for n in neighbours)


FAST_SIZING = {"toy-bigru-2"}  # the fast tier's sample; the integration tier: all


@pytest.mark.parametrize(
    ("dataset", "cell", "layers", "bi"), [c for c in sizing_cases(["toy", "mnist"]) if c.id in FAST_SIZING]
)
def test_param_budget_lands_within_2_percent(dataset, cell, layers, bi):
    check_sizing(dataset, cell, layers, bi)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("dataset", "cell", "layers", "bi"), [c for c in sizing_cases(sorted(METAS)) if c.id not in FAST_SIZING]
)
def test_param_budget_lands_within_2_percent_on_every_dataset(dataset, cell, layers, bi):
    check_sizing(dataset, cell, layers, bi)


def test_a_budget_below_the_smallest_model_takes_one_unit():
    cfg = compose_config(["experiment=toy_dynamic"]).model
    assert models.units_for_budget(cfg, METAS["toy"], 1) == (1, models.count_params(cfg, METAS["toy"], 1))


# --- seeds=N ----------------------------------------------------------------------------------------------------------
def test_seeds_expand_to_the_same_seeds_for_every_configuration():
    assert sweep.expand_seeds(["sweep=cells_toy", "seeds=3"]) == [
        "sweep=cells_toy",
        "seed=1,2,3",
        "hydra.mode=MULTIRUN",
    ]
    assert sweep.expand_seeds(["-m", "model=rnn,gru", "+seeds=2"]) == ["-m", "model=rnn,gru", "seed=1,2"]
    assert sweep.expand_seeds(["model=gru"]) == ["model=gru"]


def test_seeds_before_a_hydra_flag_still_parse_and_showing_the_config_shows_the_first_jobs():
    from hydra._internal.utils import get_args_parser

    expanded = sweep.expand_seeds(["seeds=3", "hydra.verbose=true"])
    assert expanded == ["seed=1,2,3", "hydra.mode=MULTIRUN", "hydra.verbose=true"]  # the mode beside the seeds
    args = get_args_parser().parse_args(sweep.expand_seeds(["seeds=3", "--cfg", "job"]))
    assert args.cfg == "job" and args.overrides == ["seed=1"]  # Hydra shows one config: a sweep it refuses
    assert sweep.expand_seeds(["--cfg=job", "seeds=2"]) == ["--cfg=job", "seed=1"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["seeds=0"], "seeds must be a whole number of seeds from 1 to 1000"),
        (["seeds=two"], "got 'two'"),
        (["seeds=3", "seed=1,2"], "either seeds=N (seeds 1..N) or seed=a,b,c"),
        (["seeds=3", "seeds=4"], "more than once"),
    ],
)
def test_bad_seeds_say_how_to_write_them(argv, message):
    with pytest.raises(sweep.SweepError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        sweep.expand_seeds(argv)


def test_a_regression_headline_keeps_the_digits_that_tell_solved_runs_apart():
    """Solved adding-problem runs score a few ten-thousandths: the headline must not round them all to 0.0."""
    table = pd.DataFrame(
        {
            "label": ["GRU", "LSTM", "SimpleRNN"],
            "test_mean": [0.00036, 0.00254, 0.16222],
            "test_std": [0.00005, 0.00101, 0.00141],
            "n": [5, 5, 5],
            "verdict": ["best", "worse (p = 0.009)", "worse (p < 0.001)"],
            "p": [math.nan, 0.009, 0.0001],
            "diff_mean": [0.0, 0.00218, 0.16186],  # the tested differences (paired: here the means' too)
        }
    )
    line = compare.headline("adding", table, objective.MSE)
    assert "GRU 0.0004 ± 0.0001 is best" in line and "LSTM is worse by 0.0022 (p = 0.009)" in line
    assert "SimpleRNN is worse by 0.1619" in line
