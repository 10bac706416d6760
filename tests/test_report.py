"""The report stage on an MLflow store holding runs with known numbers. The validation and test rankings differ
(a run that validates best tests worse), so the leaderboards' order shows which metric ranks: validation."""

import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline import report


def add_run(
    client,
    experiment_id,
    name,
    cell,
    params_count,
    val,
    test,
    capped=False,
    capped_epochs=False,
    status="FINISHED",
    metric="accuracy",
    extra_tags=None,
):
    run = client.create_run(experiment_id, run_name=name)
    params = {
        "model.layers": "1",
        "model.units": "64",
        "model.dropout": "0.0",
        "optimizer.name": "adam",
        "optimizer.learning_rate": "0.01",
        "trainer.batch_size": "32",
        "trainer.max_steps_per_epoch": "3" if capped or capped_epochs else "None",
        "trainer.max_eval_batches": "2" if capped else "None",
    }
    tags = {
        "dataset": experiment_id_names[experiment_id],
        "cell": cell,
        "params_count": str(params_count),
        **(extra_tags or {}),
    }
    metrics = [Metric(f"val/{metric}", v, 0, step) for step, v in enumerate(val)]
    metrics += [Metric("val/loss", 1.0 / (step + 1), 0, step) for step in range(len(val))]
    metrics += [Metric("perf/epoch_seconds", 2.0, 0, step) for step in range(len(val))]
    metrics += [Metric(f"test/{metric}", test, 0, len(val)), Metric("epochs", len(val), 0, len(val))]
    client.log_batch(
        run.info.run_id,
        metrics=metrics,
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


experiment_id_names = {}


@pytest.fixture
def store(tmp_path, mlflow_store):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    toy = client.create_experiment("rnnlab-toy", artifact_location=(tmp_path / "a").as_uri())
    ptb = client.create_experiment("rnnlab-ptb", artifact_location=(tmp_path / "a").as_uri())
    other = client.create_experiment("someone-else", artifact_location=(tmp_path / "a").as_uri())
    experiment_id_names.update({toy: "toy", ptb: "ptb", other: "toy"})
    # Best validation accuracy ranks lstm (0.97) > gru (0.96) > rnn (0.8); test accuracy ranks gru > lstm > rnn.
    # gru's best epoch is not its last (0.96, then 0.95): "best val" is the best epoch.
    # PTB: best validation perplexity ranks lstm (150) > gru (160); test perplexity ranks gru (170) > lstm (175).
    ids = {
        "lstm": add_run(client, toy, "toy-lstm", "lstm", 17026, [0.7, 0.9, 0.97], 0.93),
        "rnn": add_run(client, toy, "toy-rnn", "rnn", 4354, [0.6, 0.8], 0.81, capped_epochs=True),
        "gru": add_run(client, toy, "toy-gru", "gru", 12994, [0.7, 0.96, 0.95], 0.99),
        "ptb": add_run(client, ptb, "ptb-lstm", "lstm", 4_600_000, [300.0, 150.0], 175.0, metric="perplexity"),
        "ptb2": add_run(client, ptb, "ptb-gru", "gru", 4_000_000, [310.0, 160.0], 170.0, metric="perplexity"),
    }
    add_run(client, toy, "smoke", "lstm", 1, [0.99], 0.99, capped=True)  # left out: a capped evaluation (smoke)
    return ids


def test_leaderboards_plots_and_readme(store, make_cfg, tmp_path):
    boards = report.run(make_cfg(top="report"))
    assert sorted(boards) == ["ptb", "toy"]
    toy = boards["toy"]
    # Chosen on validation, reported on test: ranked by the best validation accuracy, not by test accuracy.
    assert list(toy["run"]) == ["toy-lstm", "toy-gru", "toy-rnn"]
    assert list(toy["best val accuracy"]) == [0.97, 0.96, 0.8]
    assert list(toy["test accuracy"]) == [0.93, 0.99, 0.81]
    assert list(toy["params"]) == [17026, 12994, 4354] and list(toy["epochs"]) == [3, 3, 2]
    assert list(toy["s/epoch"]) == [2.0, 2.0, 2.0] and list(toy["cell"]) == ["lstm", "gru", "rnn"]
    ptb = boards["ptb"]
    assert list(ptb["run"]) == ["ptb-lstm", "ptb-gru"]  # by best validation perplexity, lowest first
    assert list(ptb["best val perplexity"]) == [150.0, 160.0] and list(ptb["test perplexity"]) == [175.0, 170.0]

    reports = tmp_path / "reports"
    csv = pd.read_csv(reports / "leaderboards" / "toy.csv")
    assert list(csv["run_id"]) == [store["lstm"], store["gru"], store["rnn"]]
    curves = pd.read_csv(reports / "curves" / "toy.csv")
    assert len(curves) == 3 + 2 + 3 and set(curves["cell"]) == {"lstm", "rnn", "gru"}
    assert list(curves[curves["run_id"] == store["rnn"]]["val/accuracy"]) == [0.6, 0.8]
    for name in ("toy_curves", "toy_size", "toy_speed", "ptb_curves", "ptb_size", "ptb_speed"):
        assert (reports / "figures" / f"{name}.png").stat().st_size > 5000
    readme = (reports / "README.md").read_text()
    assert "## ptb" in readme and "## toy" in readme and "![toy_curves](figures/toy_curves.png)" in readme
    assert "| toy-lstm " in readme and "smoke" not in readme and "crashed" not in readme


def test_report_on_an_empty_store_says_what_to_do(make_cfg, tmp_path):
    assert report.run(make_cfg(top="report")) == {}
    assert "No finished runs yet" in (tmp_path / "reports" / "README.md").read_text()
    for folder in ("leaderboards", "curves", "figures"):  # DVC's declared outputs exist, empty
        assert (tmp_path / "reports" / folder).is_dir()


def test_report_with_only_capped_runs_says_how_to_include_them(make_cfg, tmp_path, mlflow_store):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    toy = client.create_experiment("rnnlab-toy", artifact_location=(tmp_path / "a").as_uri())
    experiment_id_names[toy] = "toy"
    add_run(client, toy, "smoke", "lstm", 1, [0.5], 0.99, capped=True)
    assert report.run(make_cfg(top="report")) == {}
    readme = (tmp_path / "reports" / "README.md").read_text()
    assert "1 finished run(s) had a capped evaluation" in readme and "report.include_capped=true" in readme
    assert report.run(make_cfg("report.include_capped=true", top="report"))["toy"]["run"].tolist() == ["smoke"]


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_the_report_removes_what_it_no_longer_reports(store, make_cfg, tmp_path):
    """The report's files always agree with its README: what the previous report wrote and this one does not (a
    dataset whose runs are gone; everything, on an empty store) is removed. Files the report does not own stay."""
    reports = tmp_path / "reports"
    report.run(make_cfg(top="report"))
    assert names(reports / "leaderboards") == ["ptb.csv", "ptb.md", "toy.csv", "toy.md"]
    (reports / "figures" / "notes.txt").write_text("mine")  # not the report's: kept
    (reports / "metrics").mkdir()
    (reports / "metrics" / "toy.json").write_text("{}")  # train's output: kept
    # Only the PTB runs count now: the toy leaderboard, curves and figures go; the PTB ones are rewritten.
    assert sorted(report.run(make_cfg("report.experiments=rnnlab-ptb", top="report"))) == ["ptb"]
    assert names(reports / "leaderboards") == ["ptb.csv", "ptb.md"] and names(reports / "curves") == ["ptb.csv"]
    assert names(reports / "figures") == ["notes.txt", "ptb_curves.png", "ptb_size.png", "ptb_speed.png"]
    readme = (reports / "README.md").read_text()
    assert "## ptb" in readme and "## toy" not in readme
    # An empty store: no leaderboard, curve or figure is left beside a README that says there are no runs.
    assert report.run(make_cfg(f"tracking.uri=sqlite:///{tmp_path}/empty.db", top="report")) == {}
    readme = (reports / "README.md").read_text()
    assert "No finished runs yet" in readme and "## " not in readme
    assert names(reports / "leaderboards") == [] and names(reports / "curves") == []
    assert names(reports / "figures") == ["notes.txt"] and names(reports / "metrics") == ["toy.json"]


def test_a_report_from_the_same_runs_is_not_redone(store, make_cfg, tmp_path):
    """The report stage always runs in `dvc repro` (DVC cannot see the store): with no new finished run it keeps
    its files; a run finishing since, or a change of the report's code, makes it redo them."""
    cfg = make_cfg(top="report")
    assert sorted(report.run(cfg)) == ["ptb", "toy"]
    readme = tmp_path / "reports" / "README.md"
    written = readme.stat().st_mtime_ns
    assert report.run(cfg) == {}
    assert readme.stat().st_mtime_ns == written
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    toy = client.get_experiment_by_name("rnnlab-toy").experiment_id
    add_run(client, toy, "toy-bigru", "gru", 25000, [0.98], 0.9)
    assert list(report.run(cfg)["toy"]["run"]) == ["toy-bigru", "toy-lstm", "toy-gru", "toy-rnn"]
    assert "| toy-bigru " in readme.read_text()
    index = tmp_path / "reports" / report.INDEX  # made by an older rnnlab: the same runs, other code
    index.write_text(index.read_text().replace(report.code_digest(), "0" * 16))
    assert sorted(report.run(cfg)) == ["ptb", "toy"]
    assert report.run(cfg) == {}


@pytest.mark.integration  # 12 constructed runs on 3 datasets and every figure: seconds the fast tier cannot spare
def test_seeded_runs_get_aggregated_rows_headlines_anchors_and_a_cross_dataset_ranking(
    make_cfg, tmp_path, mlflow_store
):
    client = MlflowClient(tracking_uri=mlflow_store)
    scores = {"gru": 0.95, "lstm": 0.94, "rnn": 0.70}  # + a small per-seed wobble
    for dataset in ("toy", "mnist", "imdb"):
        exp = client.create_experiment(f"rnnlab-{dataset}", artifact_location=(tmp_path / "a").as_uri())
        experiment_id_names[exp] = dataset
        for cell, score in scores.items():
            for seed in (1, 2, 3):
                value = score + 0.003 * seed + (0.0005 * seed * seed if cell == "lstm" else 0)
                anchor = {"preset": "toy_dynamic", "anchor.metric": "test/accuracy", "anchor.value": "0.95",
                          "anchor.source": "the seed"} if (dataset, cell) == ("toy", "lstm") else {}  # fmt: skip
                tags = {"config_id": f"{dataset}-{cell}", "seed": str(seed), **anchor}
                add_run(client, exp, f"{dataset}-{cell}-{seed}", cell, 100, [value], value, extra_tags=tags)
    report.run(make_cfg(top="report"))
    reports = tmp_path / "reports"
    readme = (reports / "README.md").read_text()
    assert (
        "- toy, 3 seeds each (test accuracy, mean ± std): GRU 0.956 ± 0.003 is best (chosen on validation); "
        "LSTM is worse by 0.008 (p = 0.022); SimpleRNN is worse by 0.250 (p < 0.001)."
    ) in readme
    assert "## Published numbers beside ours" in readme and "| toy_dynamic |" in readme
    assert "## Cells across datasets" in readme and "Friedman test over 3 datasets: chi2 = 6.00" in readme
    assert (reports / "figures" / "cells_critical_difference.png").stat().st_size > 5000
    table = pd.read_csv(reports / "comparisons" / "mnist.csv")
    assert list(table["label"]) == ["GRU", "LSTM", "SimpleRNN"] and list(table["n"]) == [3, 3, 3]
    assert table["test_mean"].iloc[0] == pytest.approx(0.956) and table["verdict"].iloc[0] == "best"
    assert (
        "| GRU       |      100 |       3 | 0.9560 ± 0.0030 | [0.9485, 0.9635] |"
        in (reports / "comparisons" / "mnist.md").read_text()
    )


def test_search_trials_get_their_own_section_with_expected_best_curves_and_pruned_counts(store, make_cfg, tmp_path):
    """Trials of a search (tagged with a study) are not seeds of a comparison: they get the tuning section, with
    each cell's trials, pruned count, best trial, and the expected best of n trials."""
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    toy = client.get_experiment_by_name("rnnlab-toy").experiment_id
    trials = {"gru": [[0.6, 0.9], [0.7, 0.8], [0.5, 0.55]], "rnn": [[0.5, 0.6], [0.55, 0.7], [0.5, 0.52]]}
    for cell, curves in trials.items():
        for number, val in enumerate(curves):
            pruned = number == 2  # the third trial of each cell was stopped by the pruner
            tags = {"study": f"s model={cell}", "trial": str(number), "sweep": "tune", "trial_state": "PRUNED"}
            if not pruned:
                tags["trial_state"] = "COMPLETE"
            add_run(client, toy, f"t-{cell}-{number}", cell, 100, val, 0.5, extra_tags=tags)
    tags = {"study": "s model=rnn", "trial": "3", "sweep": "tune"}  # diverged: counts as the study's worst value
    add_run(client, toy, "t-rnn-3", "rnn", 100, [0.5], 0.5, status="FAILED", extra_tags=tags)
    boards = report.run(make_cfg(top="report"))
    assert list(boards["toy"]["run"]) == ["toy-lstm", "toy-gru", "toy-rnn"]  # trials stay out of the comparison
    table = pd.read_csv(tmp_path / "reports" / "comparisons" / "tuning_toy_tune.csv")
    assert len(table) == 7 and (table["state"] == "PRUNED").sum() == 2 and (table["state"] == "FAILED").sum() == 1
    readme = (tmp_path / "reports" / "README.md").read_text()
    section = readme.split("## Tuning budget")[1]
    gru = next(line for line in section.splitlines() if line.startswith("| s model=gru"))
    cells = [c.strip() for c in gru.strip("|").split("|")]
    # trials 3, pruned 1, failed 0, best trial 0 (0.9); expected best of 1 = mean(0.9, 0.8, 0.55), of 3 = the formula
    assert cells[1:7] == ["GRU", "3", "1", "0", "0", "0.9"]
    assert float(cells[8]) == pytest.approx(0.75, abs=1e-4)
    assert float(cells[9]) == pytest.approx(0.55 / 27 + 0.8 * 7 / 27 + 0.9 * 19 / 27, abs=1e-4)
    rnn = [
        c.strip() for c in next(x for x in section.splitlines() if x.startswith("| s model=rnn")).strip("|").split("|")
    ]
    assert rnn[2:5] == ["4", "1", "1"] and float(rnn[8]) == pytest.approx((0.6 + 0.7 + 0.52 + 0.52) / 4, abs=1e-4)
    assert (tmp_path / "reports" / "figures" / "tuning_toy_tune.png").stat().st_size > 5000
