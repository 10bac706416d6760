"""Published results: anchors a reader can open, no verdict from too few seeds, the project's results kept apart from
the user's, and product files that speak of rnnlab alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf, open_dict

from pipeline import compare, config, figures, results
from pipeline.config import StudyConfig
from pipeline.schema import ConfigError
from tests.conftest import CONF, REPO, compose_config

PRESETS = sorted((CONF / "experiment").glob("*.yaml")) + sorted((CONF / "sweep").glob("*.yaml"))


# --- Anchors -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_published_figure_names_a_public_source(path):
    anchor = OmegaConf.load(path).get("anchor")
    if anchor is None or anchor.get("value") is None:
        return
    assert config.anchor_problem(anchor) is None, f"{path.name}: {config.anchor_problem(anchor)}"


def test_the_presets_with_published_figures_are_the_ones_with_a_source():
    anchored = {p.stem for p in PRESETS if (OmegaConf.load(p).get("anchor") or {}).get("value") is not None}
    assert anchored == {"ptb_small", "ptb_medium", "ptb_large", "imdb_long_lstm", "smnist_lstm", "pmnist_lstm"}


@pytest.mark.parametrize(
    ("anchor", "problem"),
    [
        ({"metric": "test/accuracy", "value": 0.99, "source": "the seed's figure"}, "names no year"),
        ({"metric": "test/accuracy", "value": 0.99, "source": "Smith, A paper (2019)"}, "says not where"),
        ({"metric": None, "value": 0.99, "source": "Smith, A paper (2019), table 2"}, "anchor.metric"),
    ],
)
def test_an_anchor_without_a_public_source_is_refused(anchor, problem):
    assert problem in config.anchor_problem(anchor)
    cfg = compose_config(["experiment=toy_dynamic"])
    cfg.anchor.metric, cfg.anchor.value, cfg.anchor.source = anchor["metric"], anchor["value"], anchor["source"]
    with pytest.raises(ConfigError, match="anchor"):
        config.validate(cfg)


def test_an_anchor_with_a_table_or_a_url_is_citable():
    assert (
        config.anchor_problem({"metric": "test/loss", "value": 1, "source": "Smith, A paper (2019), table 2"}) is None
    )
    cited = {"metric": "test/loss", "value": 1, "source": "Smith, A paper (2019)", "url": "https://example.org/paper"}
    assert config.anchor_problem(cited) is None


def anchored_runs(seeds: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "config_id": ["a"] * seeds,
            "test": [0.97, 0.98, 0.99][:seeds],
            "best_val": [0.97, 0.98, 0.99][:seeds],
            "tags.preset": ["mnist_lstm"] * seeds,
            "tags.anchor.metric": ["test/accuracy"] * seeds,
            "tags.anchor.value": ["0.975"] * seeds,
            "tags.anchor.source": ["Smith, A paper (2019)"] * seeds,
            "tags.anchor.url": ["https://example.org/paper"] * seeds,
        }
    )


@pytest.mark.parametrize(("seeds", "verdict"), [(1, "needs >= 3 seeds"), (2, "needs >= 3 seeds"), (3, "reproduced")])
def test_no_verdict_on_a_published_figure_from_fewer_than_3_seeds(seeds, verdict):
    row = compare.anchors(anchored_runs(seeds)).iloc[0]
    assert row["verdict"] == verdict and row["n"] == seeds and row["published"] == 0.975


def test_the_report_links_a_source_that_has_a_url():
    lines = figures.anchors_section(compare.anchors(anchored_runs(3)))
    assert "[Smith, A paper (2019)](https://example.org/paper)" in "\n".join(lines)
    assert "url" not in lines[-1].splitlines()[0]  # the link replaces the column
    one_seed = figures.anchors_section(compare.anchors(anchored_runs(1)))[-1]
    assert "nan" not in one_seed and "| –" in one_seed  # no interval from one seed: a dash, not "nan"


# --- Product files speak of rnnlab alone ---------------------------------------------------------------------------
FORBIDDEN = re.compile(
    r"\bissues? ?#?\d+|\bissue tracker|\btracker issue|\bticket #?\d+|\bfiled by\b|/issues/\d+"
    r"|\bthe seed'?s (model|figure|task|number)|\bseed 0\d\d\b|\bas the seed\b",
    re.IGNORECASE,
)


def product_files() -> list[Path]:
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True).stdout
    skip = (".png", ".lock", ".keras", ".db")
    own = Path(__file__).resolve()
    return [REPO / f for f in listed.splitlines() if not f.endswith(skip) and (REPO / f).resolve() != own]


def test_no_product_file_speaks_of_issues_trackers_or_source_seeds():
    hits = []
    for path in product_files():
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        hits += [f"{path.relative_to(REPO)}: {m.group(0)!r}" for m in FORBIDDEN.finditer(text)]
    assert not hits, "product files must speak of rnnlab alone:\n" + "\n".join(hits)


@pytest.mark.parametrize("text", ["see issue 12", "as filed by a user", "the seed's figure", "(seed 001)"])
def test_the_product_file_check_can_fail(text):
    assert FORBIDDEN.search(text)


@pytest.mark.parametrize("text", ["seeds 1-5", "MLflow's Detect Issues view", "tracker.log_metrics", "seed=42"])
def test_the_product_file_check_lets_ordinary_words_through(text):
    assert not FORBIDDEN.search(text)


# --- Two kinds of results ------------------------------------------------------------------------------------------
def test_the_users_outputs_are_not_tracked_and_the_published_results_are():
    tracked = set(subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True).stdout.split())
    assert {f for f in tracked if f.startswith("reports/")} == {"reports/.gitignore"}
    assert "docs/results/README.md" in tracked and "docs/results/cells_classifiers/study.json" in tracked
    ignored = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", "reports/README.md", "reports/metrics/toy.json", "reports/bench.md"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert ignored == ["reports/README.md", "reports/metrics/toy.json", "reports/bench.md"]


def test_the_default_outputs_go_to_reports_and_the_published_ones_to_docs():
    assert Path(compose_config([], "report").paths.reports) == REPO / "reports"
    assert Path(compose_config([], "results").results.dir) == REPO / "docs" / "results"


def test_each_study_line_trains_into_the_studys_own_store(tmp_path):
    (argv,) = results.train_commands(["sweep=cells_ptb_matched model=rnn optimizer.learning_rate=0.1"], tmp_path)
    assert argv[1:5] == ["-m", "pipeline.train", "sweep=cells_ptb_matched", "model=rnn"]
    assert f"tracking.uri=sqlite:///{tmp_path.resolve()}/mlflow.db" in argv and "tracking.log_model=false" in argv


def test_an_unknown_study_is_refused_with_the_known_ones(tmp_path):
    cfg = compose_config([f"results.dir={tmp_path}", "results.study=cells_pbt"], "results")
    with pytest.raises(results.StudyError, match="cells_pbt.*cells_ptb"):
        results.run(cfg)


def fake_study(folder: Path, name: str, datasets: dict[str, dict[str, float]]) -> None:
    """A study folder as `make results` leaves it: study.json, README headlines, a comparison per dataset."""
    (folder / name / "comparisons").mkdir(parents=True)
    made = {"study": name, "title": f"{name} title", "commands": [f"python -m pipeline.train sweep={name}"]}
    made |= {"commit": "0123456789abcdef0123", "cpu": "Some CPU x2; avx2 fma", "date": "2026-12-04", "minutes": 42.4}
    (folder / name / results.STUDY_FILE).write_text(json.dumps(made))
    heads = [f"- {d}: {next(iter(cells))} is best" for d, cells in datasets.items()]  # best on validation first
    (folder / name / "README.md").write_text("# report\n\n## Headlines\n\n" + "\n".join(heads) + "\n\n## toy\n")
    for dataset, cells in datasets.items():
        table = pd.DataFrame({"label": list(cells), "test_mean": list(cells.values())})
        table.to_csv(folder / name / "comparisons" / f"{dataset}.csv", index=False)


def test_the_index_lists_each_study_and_ranks_the_cells_over_all_their_datasets(tmp_path):
    fake_study(tmp_path, "one", {"toy": {"GRU": 0.99, "LSTM": 0.98, "SimpleRNN": 0.6}})
    fake_study(tmp_path, "two", {"mnist": {"GRU": 0.98, "LSTM": 0.97, "SimpleRNN": 0.9}})
    fake_study(tmp_path, "three", {"ptb": {"LSTM": 120.0, "GRU": 125.0, "SimpleRNN": 160.0}})  # lower is better
    fake_study(tmp_path, "zzz", {"mnist": {"SimpleRNN": 0.99}})  # one preset: the comparison above is kept
    text = results.write_index(tmp_path).read_text()
    assert "[one](one/README.md)" in text and "0123456789ab" in text and "42 min" in text and "Some CPU" in text
    assert "- toy: GRU is best" in text and "- ptb: LSTM is best" in text
    ranks = text[text.index("## Cells across datasets") :]
    assert "Friedman test over 3 datasets" in ranks
    assert re.search(r"\| ptb +\| +2 +\| +1 +\| +3 +\|", ranks)  # GRU, LSTM, SimpleRNN
    assert (tmp_path / "figures" / figures.CD_FIGURE).stat().st_size > 5000


def test_the_committed_index_matches_the_committed_studies(tmp_path):
    published = REPO / "docs" / "results"
    assert (published / "README.md").read_text() == "\n".join(results.index_lines(published, tmp_path)) + "\n"


SMALL_TOY = ["data=toy", "data.n_train=64", "data.n_val=32", "data.n_test=32"]


@pytest.mark.integration
def test_a_study_trains_into_its_own_store_and_renders_its_report_apart_from_the_users(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNLAB_ROOT", str(tmp_path))
    prepare = [sys.executable, "-m", "pipeline.prepare", *SMALL_TOY]
    subprocess.run(prepare, cwd=REPO, check=True, capture_output=True)
    cfg = compose_config(
        [f"paths.root={tmp_path}", f"results.dir={tmp_path}/published", "results.study=tiny"], "results"
    )
    line = f"-m experiment=toy_dynamic {' '.join(SMALL_TOY[1:])} model.units=8 trainer.epochs=2 seed=1,2,3"
    with open_dict(cfg):
        cfg.studies["tiny"] = StudyConfig(title="three tiny seeds", runs=[line])
    index = results.run(cfg)
    made = json.loads((tmp_path / "published/tiny/study.json").read_text())
    assert made["commands"] == [f"python -m pipeline.train {line}"] and made["minutes"] > 0 and made["cpu"]
    assert "3 seeds each" in (tmp_path / "published/tiny/README.md").read_text()
    assert "[tiny](tiny/README.md)" in index.read_text() and "three tiny seeds" in index.read_text()
    assert (tmp_path / "published/tiny/mlflow.db").exists()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "reports").exists()  # the user's: untouched


def comparison(folder: Path, study: str, dataset: str, cells: list[str]) -> None:
    (folder / study / "comparisons").mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"label": [f"{c} units=8" for c in cells], "test_mean": range(len(cells))})
    table.to_csv(folder / study / "comparisons" / f"{dataset}.csv", index=False)


def test_a_study_of_other_cells_on_a_dataset_leaves_the_ranking_over_every_dataset_whole(tmp_path):
    classic = ["SimpleRNN", "LSTM", "GRU"]
    for dataset in ("toy", "mnist", "ptb"):
        comparison(tmp_path, "cells", dataset, classic)
    comparison(tmp_path, "variants", "mnist", ["LSTM", "Peephole", "CIFG", "NFG", "NOAF", "GRU", "MGU"])
    comparison(tmp_path, "presets", "imdb_long", ["LSTM"])  # one cell over seeds: it compares nothing
    comparison(tmp_path, "presets", "mnist", ["BiLSTM"])
    tables, objectives = results.dataset_tables(tmp_path)
    assert results.cells_in(tables["mnist"]) == set(classic)  # not the variants' 7 rows: they lack SimpleRNN
    assert set(compare.cell_ranks(tables, objectives)["average"].index) == set(classic)
    comparison(tmp_path, "more", "mnist", [*classic, "MGU"])  # the shared cells and more rows: this one
    assert len(results.dataset_tables(tmp_path)[0]["mnist"]) == 4


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("pmnist", "mnist"),
        ("smnist", "mnist"),
        ("imdb_long", "imdb"),
        ("adding_t50", "adding"),
        ("copy_memory", "copy_memory"),
    ],
)
def test_each_dataset_name_maps_to_the_module_that_builds_it(name, source):
    assert results.source_of(name) == source  # pmnist through smnist's defaults; adding_t50 from data.name=


def test_a_dataset_name_of_no_known_source_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'letters'"):
        results.source_of("letters")
