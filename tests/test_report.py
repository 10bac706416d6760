"""The report stage on an MLflow store holding runs with known numbers."""

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
        "trainer.max_steps_per_epoch": "3" if capped else "None",
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
def store(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    toy = client.create_experiment("rnnlab-toy", artifact_location=(tmp_path / "a").as_uri())
    ptb = client.create_experiment("rnnlab-ptb", artifact_location=(tmp_path / "a").as_uri())
    other = client.create_experiment("someone-else", artifact_location=(tmp_path / "a").as_uri())
    experiment_id_names.update({toy: "toy", ptb: "ptb", other: "toy"})
    ids = {
        "lstm": add_run(client, toy, "toy-lstm", "lstm", 17026, [0.7, 0.9, 0.95], 0.97),
        "rnn": add_run(client, toy, "toy-rnn", "rnn", 4354, [0.6, 0.8], 0.81),
        "gru": add_run(client, toy, "toy-gru", "gru", 12994, [0.7, 0.99, 0.98], 0.99),
        "ptb": add_run(client, ptb, "ptb-lstm", "lstm", 4_600_000, [300.0, 150.0], 140.0, metric="perplexity"),
        "ptb2": add_run(client, ptb, "ptb-gru", "gru", 4_000_000, [310.0, 180.0], 170.0, metric="perplexity"),
    }
    add_run(client, toy, "smoke", "lstm", 1, [0.5], 0.99, capped=True)  # left out: a capped (smoke) run
    add_run(client, toy, "crashed", "lstm", 1, [0.5], 1.0, status="FAILED")  # left out: not finished
    add_run(client, toy, "parent", "lstm", 1, [0.5], 1.0, extra_tags={"sweep_role": "parent"})  # left out
    add_run(client, other, "foreign", "lstm", 1, [0.5], 1.0)  # left out: not an rnnlab experiment
    return ids


def test_leaderboards_plots_and_readme(store, make_cfg, tmp_path):
    boards = report.run(make_cfg())
    assert sorted(boards) == ["ptb", "toy"]
    toy = boards["toy"]
    assert list(toy["run"]) == ["toy-gru", "toy-lstm", "toy-rnn"]  # by test accuracy, best first
    assert list(toy["best val accuracy"]) == [0.99, 0.95, 0.8]
    assert list(toy["test accuracy"]) == [0.99, 0.97, 0.81]
    assert list(toy["params"]) == [12994, 17026, 4354] and list(toy["epochs"]) == [3, 3, 2]
    assert list(toy["s/epoch"]) == [2.0, 2.0, 2.0] and list(toy["cell"]) == ["gru", "lstm", "rnn"]
    ptb = boards["ptb"]
    assert list(ptb["run"]) == ["ptb-lstm", "ptb-gru"]  # by test perplexity, lowest first
    assert list(ptb["best val perplexity"]) == [150.0, 180.0]

    reports = tmp_path / "reports"
    csv = pd.read_csv(reports / "leaderboards" / "toy.csv")
    assert list(csv["run_id"]) == [store["gru"], store["lstm"], store["rnn"]]
    curves = pd.read_csv(reports / "curves" / "toy.csv")
    assert len(curves) == 3 + 2 + 3 and set(curves["cell"]) == {"lstm", "rnn", "gru"}
    assert list(curves[curves["run_id"] == store["rnn"]]["val/accuracy"]) == [0.6, 0.8]
    for name in ("toy_curves", "toy_size", "toy_speed", "ptb_curves", "ptb_size", "ptb_speed"):
        assert (reports / "figures" / f"{name}.png").stat().st_size > 5000
    readme = (reports / "README.md").read_text()
    assert "## ptb" in readme and "## toy" in readme and "![toy_curves](figures/toy_curves.png)" in readme
    assert "| toy-gru " in readme and "smoke" not in readme and "crashed" not in readme


def test_report_on_an_empty_store_says_what_to_do(make_cfg, tmp_path):
    assert report.run(make_cfg()) == {}
    assert "No finished runs yet" in (tmp_path / "reports" / "README.md").read_text()
    for folder in ("leaderboards", "curves", "figures"):  # DVC's declared outputs exist, empty
        assert (tmp_path / "reports" / folder).is_dir()


def test_report_with_only_capped_runs_says_how_to_include_them(make_cfg, tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    toy = client.create_experiment("rnnlab-toy", artifact_location=(tmp_path / "a").as_uri())
    experiment_id_names[toy] = "toy"
    add_run(client, toy, "smoke", "lstm", 1, [0.5], 0.99, capped=True)
    assert report.run(make_cfg()) == {}
    readme = (tmp_path / "reports" / "README.md").read_text()
    assert "1 finished run(s) had a step cap" in readme and "report.include_capped=true" in readme
    assert report.run(make_cfg("report.include_capped=true"))["toy"]["run"].tolist() == ["smoke"]


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_the_report_removes_what_it_no_longer_reports(store, make_cfg, tmp_path):
    """The report's files always agree with its README: what the previous report wrote and this one does not (a
    dataset whose runs are gone; everything, on an empty store) is removed. Files the report does not own stay."""
    reports = tmp_path / "reports"
    report.run(make_cfg())
    assert names(reports / "leaderboards") == ["ptb.csv", "ptb.md", "toy.csv", "toy.md"]
    (reports / "figures" / "notes.txt").write_text("mine")  # not the report's: kept
    (reports / "metrics").mkdir()
    (reports / "metrics" / "toy.json").write_text("{}")  # train's output: kept
    # Only the PTB runs count now: the toy leaderboard, curves and figures go; the PTB ones are rewritten.
    assert sorted(report.run(make_cfg("report.experiments=rnnlab-ptb"))) == ["ptb"]
    assert names(reports / "leaderboards") == ["ptb.csv", "ptb.md"] and names(reports / "curves") == ["ptb.csv"]
    assert names(reports / "figures") == ["notes.txt", "ptb_curves.png", "ptb_size.png", "ptb_speed.png"]
    readme = (reports / "README.md").read_text()
    assert "## ptb" in readme and "## toy" not in readme
    # An empty store: no leaderboard, curve or figure is left beside a README that says there are no runs.
    assert report.run(make_cfg(f"tracking.uri=sqlite:///{tmp_path}/empty.db")) == {}
    readme = (reports / "README.md").read_text()
    assert "No finished runs yet" in readme and "## " not in readme
    assert names(reports / "leaderboards") == [] and names(reports / "curves") == []
    assert names(reports / "figures") == ["notes.txt"] and names(reports / "metrics") == ["toy.json"]
