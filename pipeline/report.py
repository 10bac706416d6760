"""Report stage: MLflow runs -> leaderboards (Markdown, CSV) and plots (PNG) under ``reports/``.

python -m pipeline.report                      # every finished run in the local store
python -m pipeline.report report.include_capped=true   # runs with a capped evaluation (budget=smoke) too
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
import matplotlib
import pandas as pd
from omegaconf import DictConfig

from pipeline import compare, config, data, figures, tracking
from pipeline.objective import BY_KIND, Objective, of_curves, of_runs
from pipeline.redaction import redact

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

log = logging.getLogger(__name__)

config.register()

# Leaderboard columns: ours <- MLflow's.
COLUMNS = {
    "run": "tags.mlflow.runName",
    "cell": "tags.cell",
    "layers": "params.model.layers",
    "units": "params.model.units",
    "dropout": "params.model.dropout",
    "optimizer": "params.optimizer.name",
    "lr": "params.optimizer.learning_rate",
    "batch": "params.trainer.batch_size",
    "params": "tags.params_count",
    "epochs": "metrics.epochs",
    "sweep": "tags.sweep",
    "run_id": "run_id",
}
CURVE_KEYS = ["val/loss", *dict.fromkeys(o.val for o in BY_KIND.values()), "perf/epoch_seconds"]  # each kind's


def leaderboard(runs: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """One row per run: cell, key hyper-parameters, size, best validation and test metric, epochs, time."""
    objective = of_runs(runs)
    metric, higher = objective.metric, objective.higher
    table = pd.DataFrame({name: runs.get(col) for name, col in COLUMNS.items()})
    table["sweep"] = table["sweep"].fillna("")
    table[f"best val {metric}"] = table["run_id"].map(objective.best_val(curves))
    table[f"test {metric}"] = runs[f"metrics.test/{metric}"].values
    seconds = curves[curves["key"] == "perf/epoch_seconds"].groupby("run_id")["value"]
    table["s/epoch"] = table["run_id"].map(seconds.mean()).round(1)
    table["minutes"] = ((runs["end_time"] - runs["start_time"]).dt.total_seconds() / 60).round(1).values
    table["params"] = pd.to_numeric(table["params"], errors="coerce").astype("Int64")
    table["epochs"] = pd.to_numeric(table["epochs"], errors="coerce").astype("Int64")
    for col in (f"best val {metric}", f"test {metric}"):
        table[col] = table[col].astype(float).round(4)
    # Choose on validation, report on test: ranking by the test metric would select on the test set.
    table = table.sort_values(f"best val {metric}", ascending=not higher, kind="stable").reset_index(drop=True)
    order = [
        "run",
        "cell",
        "layers",
        "units",
        "dropout",
        "optimizer",
        "lr",
        "batch",
        "params",
        f"best val {metric}",
        f"test {metric}",
        "epochs",
        "s/epoch",
        "minutes",
        "sweep",
        "run_id",
    ]
    return table[order]


def plot_curves(name: str, table: pd.DataFrame, runs: pd.DataFrame, curves: pd.DataFrame, out: Path) -> Path:
    """Validation loss and the task metric per epoch: per configuration the mean over seeds, shaded with its 95%
    interval (a configuration with one seed is a plain line)."""
    metric = of_curves(curves).metric
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = dict(zip(table["config_id"], table["label"], strict=True))
    for ax, key in zip(axes, ["val/loss", f"val/{metric}"], strict=True):
        for config_id, band in compare.bands(runs, curves, key).groupby("config_id", sort=False):
            line = ax.plot(band["epoch"], band["mean"], marker="o", ms=3, label=labels.get(config_id, config_id))[0]
            ax.fill_between(band["epoch"], band["ci_low"], band["ci_high"], color=line.get_color(), alpha=0.2)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{name}: validation loss (mean, 95% interval over seeds)")
    axes[1].set_title(f"{name}: validation {metric}")
    axes[1].legend(fontsize=7)
    return figures.save(fig, out / f"{name}_curves.png")


def plot_trade_offs(name: str, table: pd.DataFrame, objective: Objective, out: Path) -> list[Path]:
    """The test metric (mean, 95% interval as error bars) against parameter count and against seconds per epoch:
    the trade-off fronts."""
    paths = []
    for x, xlabel, suffix, log_x in [
        ("params", "trainable parameters", "size", True),
        ("s_per_epoch", "seconds per epoch (mean over seeds)", "speed", False),
    ]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for row in table.itertuples():
            half = (row.test_ci_high - row.test_ci_low) / 2 if row.n > 1 else 0.0
            ax.errorbar(float(getattr(row, x)), row.test_mean, yerr=half, fmt="o", capsize=4, label=row.label)
        ax.set_xscale("log" if log_x else "linear")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {objective.metric}")
        ax.set_title(f"{name}: test {objective.metric} vs {suffix}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(figures.save(fig, out / f"{name}_{suffix}.png"))
    return paths


# The files the report writes, by folder: a report run owns every file matching these and nothing else there.
OWNED = {
    "leaderboards": ("*.md", "*.csv"),
    "comparisons": ("*.md", "*.csv"),
    "curves": ("*.csv",),
    "figures": ("*_curves.png", "*_size.png", "*_speed.png", "cells_critical_difference.png", "tuning_*.png"),
}


@dataclass
class DatasetReport:
    """One dataset's results: the runs leaderboard, the configurations aggregated over seeds, and the files."""

    name: str
    objective: Objective
    board: pd.DataFrame
    runs: pd.DataFrame
    table: pd.DataFrame
    files: list[Path]


def shown(table: pd.DataFrame, objective: Objective) -> pd.DataFrame:
    """The aggregated table as a reader sees it: mean ± std and the 95% interval in one cell each."""
    digits = objective.digits

    def pm(prefix: str) -> pd.Series:
        return table.apply(lambda r: f"{r[f'{prefix}_mean']:.{digits}f} ± {r[f'{prefix}_std']:.{digits}f}", axis=1)

    def ci(prefix: str) -> pd.Series:
        return table.apply(
            lambda r: f"[{r[f'{prefix}_ci_low']:.{digits}f}, {r[f'{prefix}_ci_high']:.{digits}f}]", axis=1
        )

    fixed = {"label", "config_id", "params", "n", "seeds", "s_per_epoch", "p", "test", "verdict"}
    varying = [c for c in table.columns if c not in fixed and not c.startswith(("test_", "val_", "diff_"))]
    out = table[["label", *varying]].copy()
    out["params"] = table["params"].astype("Int64")
    out["seeds"] = table["n"]
    out[f"test {objective.metric}"], out["test 95% CI"] = pm("test"), ci("test")
    out[f"best val {objective.metric}"], out["val 95% CI"] = pm("val"), ci("val")
    out["s/epoch"] = table["s_per_epoch"].round(1)
    out["vs best (test)"] = table["verdict"]
    out["difference [95% CI]"] = table.apply(  # none where no test was made (fewer than 3 seeds)
        lambda r: (
            f"{r.diff_mean:+.{digits}f} [{r.diff_ci_low:+.{digits}f}, {r.diff_ci_high:+.{digits}f}]"
            if pd.notna([r.diff_mean, r.diff_ci_low, r.diff_ci_high]).all()
            else "–"
        ),
        axis=1,
    )
    out.loc[0, "difference [95% CI]"] = ""  # the best itself
    return out.replace("nan", "–", regex=True)


def write_dataset(name: str, runs: pd.DataFrame, curves: pd.DataFrame, out: Path) -> DatasetReport:
    """One dataset's leaderboard and aggregated comparison (Markdown, CSV), curves (CSV) and figures."""
    runs = runs.reset_index(drop=True)
    board, objective = leaderboard(runs, curves), of_runs(runs)
    per_run = compare.per_run(runs, curves, objective)
    table = compare.aggregate(per_run, objective)
    files = [out / "leaderboards" / f"{name}.csv", out / "leaderboards" / f"{name}.md", out / "curves" / f"{name}.csv"]
    board.to_csv(files[0], index=False)
    files[1].write_text(board.to_markdown(index=False) + "\n")
    own = curves[curves["run_id"].isin(board["run_id"])].copy()
    own["cell"] = own["run_id"].map(dict(zip(board["run_id"], board["cell"], strict=True)))
    wide = own.pivot_table(index=["run_id", "cell", "step"], columns="key", values="value").reset_index()
    wide.insert(3, "epoch", wide.pop("step") + 1)
    wide.to_csv(files[2], index=False)
    files += [out / "comparisons" / f"{name}.csv", out / "comparisons" / f"{name}.md"]
    table.to_csv(files[3], index=False)
    files[4].write_text(shown(table, objective).to_markdown(index=False) + "\n")
    folder = out / "figures"
    files += [plot_curves(name, table, per_run, own, folder), *plot_trade_offs(name, table, objective, folder)]
    return DatasetReport(name, objective, board, per_run, table, files)


def baseline(runs: pd.DataFrame) -> list[str]:
    """The score of a model without memory, where the dataset states one (the adding and copy tasks): a result near
    it means the cell learnt nothing across the delay."""
    if "tags.baseline.value" not in runs:
        return []
    stated = runs.dropna(subset=["tags.baseline.value"])
    if stated.empty:
        return []
    row = stated.iloc[-1]
    metric, value = row["tags.baseline.metric"], float(row["tags.baseline.value"])
    return ["", f"Baseline without memory ({row['tags.baseline.what']}): test {metric} {value:.4g}."]


def render(reports: list[DatasetReport], out: Path) -> tuple[list[str], list[Path]]:
    """README.md's body: headlines, published numbers, the cross-dataset ranking, then each dataset's aggregated
    table, figures and runs. Returns the lines and the figures written for it."""
    if not reports:
        return [], []
    lines = ["", "## Headlines", ""]
    lines += [f"- {compare.headline(r.name, r.table, r.objective)}" for r in reports]
    lines += [
        "",
        f"Best = best mean validation metric (best epoch), among the configurations with at least "
        f"{compare.MIN_SEEDS} seeds where there are any. Every other configuration is compared with it on "
        f"the test metric: {compare.TEST}. Intervals: 95% t-intervals of the mean over seeds.",
    ]
    lines += figures.anchors_section(pd.concat([compare.anchors(r.runs) for r in reports], ignore_index=True))
    tables, objectives = {r.name: r.table for r in reports}, {r.name: r.objective for r in reports}
    lines_cd, written = figures.cell_ranks_section(tables, objectives, out / "figures")
    lines += lines_cd
    for r in reports:
        lines += [
            f"\n## {r.name}\n",
            compare.headline(r.name, r.table, r.objective),
            *baseline(r.runs),
            "",
            "### Configurations (aggregated over seeds)",
            "",
            shown(r.table, r.objective).to_markdown(index=False),
            "",
        ]
        lines += [f"![{p.stem}](figures/{p.name})" for p in r.files if p.suffix == ".png"]
        lines += ["", "### Runs", "", r.board.drop(columns=["run_id"]).to_markdown(index=False), ""]
    return lines, written


def with_failed_trials(cfg: DictConfig, trials: pd.DataFrame, curves: pd.DataFrame) -> tuple:
    """Search trials and curves plus the FAILED (diverged) trials: they count in the expected-best curve."""
    failed = tracking.finished_runs(cfg.tracking.uri, cfg.report.experiments, status="FAILED")
    if "tags.study" not in failed:
        return trials, curves
    failed = failed[failed["tags.study"].notna()]
    more = tracking.metric_histories(cfg.tracking.uri, list(failed["run_id"]), CURVE_KEYS)
    return pd.concat([trials, failed], ignore_index=True), pd.concat([curves, more], ignore_index=True)


def write_tuning(runs: pd.DataFrame, curves: pd.DataFrame, out: Path) -> tuple[list[str], list[Path]]:
    """The searches (runs tagged with an Optuna study), per dataset and sweep: each cell's trials, pruned count and
    best trial, and its expected best validation metric against the number of trials, with a bootstrap band."""
    if runs.empty:
        return [], []
    lines, files = ["", "## Tuning budget: expected best vs trials", "", f"Curves: {compare.TUNING}.", ""], []
    for (dataset, sweep), group in sorted(runs.groupby(["tags.dataset", "tags.sweep"], dropna=False)):
        objective = of_runs(group)
        table = compare.trials(group, curves, objective)
        summary = compare.tuning_summary(table, objective)
        name = f"tuning_{dataset}_{sweep}"
        files.append(out / "comparisons" / f"{name}.csv")
        table.to_csv(files[-1], index=False)
        files.append(
            plot_tuning(
                f"{dataset}, {sweep}",
                compare.tuning_curves(table, objective),
                summary,
                objective,
                out / "figures" / f"{name}.png",
            )
        )
        lines += [
            f"### {dataset}: {sweep}",
            "",
            summary.round(4).to_markdown(index=False),
            "",
            f"![{name}](figures/{name}.png)",
            "",
        ]
    return lines, files


def plot_tuning(title: str, curves: dict, summary: pd.DataFrame, objective: Objective, path: Path) -> Path:
    """Each study's expected best validation metric against the number of trials, shaded with its band; with three
    or more cells a second panel zooms in on all but the worst (close curves would hide under one line)."""
    curves = {study: curve for study, curve in curves.items() if len(curve)}  # a study whose trials all failed
    zoom = len(curves) >= 3
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(12 if zoom else 7, 4.5), squeeze=False)
    cells = dict(zip(summary["study"], summary["cell"], strict=True))
    final = {study: curve["expected"].iloc[-1] for study, curve in curves.items()}
    worst = (min if objective.higher else max)(final, key=final.get)
    for ax, shown_curves in zip(axes[0], [curves, {k: v for k, v in curves.items() if k != worst}], strict=False):
        for study, curve in curves.items():
            if study not in shown_curves:
                ax.plot([], [])  # keep each cell's colour the same in both panels
                continue
            line = ax.plot(curve["n"], curve["expected"], marker="o", ms=3, label=f"{cells.get(study, study)}")[0]
            ax.fill_between(curve["n"], curve["low"], curve["high"], color=line.get_color(), alpha=0.15)
        ax.set_xlabel("trials (hyper-parameter assignments)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"expected best {objective.val}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_title(f"{title}: expected best of n trials (95% bootstrap band)", fontsize=10)
    if zoom:
        axes[0][1].set_title(f"without {cells.get(worst, worst)}", fontsize=10)
    return figures.save(fig, path)


def remove_stale(out: Path, written: list[Path]) -> list[Path]:
    """Delete the report's own files that this report did not write (a dataset whose runs are gone), so that the
    leaderboards, curves and figures always match README.md. Other files in those folders are left alone."""
    keep = {path.resolve() for path in written}
    stale = sorted(
        path
        for folder, patterns in OWNED.items()
        for pattern in patterns
        for path in (out / folder).glob(pattern)
        if path.is_file() and path.resolve() not in keep
    )
    for path in stale:
        path.unlink()
        log.info("removed %s: not part of this report", path)
    return stale


INDEX = ".index.json"  # the runs the report was last made from (git-ignored: run ids differ between clones)


def store_name(cfg: DictConfig) -> str:
    """The store as a reader of the committed report should see it: a local store relative to the checkout (no
    machine's absolute path), a server without its password."""
    uri = redact(cfg.tracking.uri)
    root = Path(cfg.paths.root).resolve()
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if path.is_relative_to(root):
            return f"sqlite:///{path.relative_to(root)} (in the checkout)"
    return uri


def code_digest() -> str:
    """sha256 of the code that computes and renders the report: a new rnnlab redoes a report of the same runs."""
    return data.digest_files([Path(__file__), Path(compare.__file__)])[:16]


def up_to_date(out: Path, index: dict) -> bool:
    """The report in ``out`` was made from exactly these runs by this code and all its files are there: nothing to
    redo."""
    try:
        previous = json.loads((out / INDEX).read_text())
    except (OSError, ValueError):
        return False
    return previous == index and (out / "README.md").exists()


def run(cfg: DictConfig) -> dict[str, pd.DataFrame]:
    """Write a leaderboard per dataset, the plots and ``reports/README.md``, and remove the previous report's
    files that this one does not replace; return the leaderboards."""
    config.validate(cfg, "report")
    out = Path(cfg.paths.reports)
    for folder in OWNED:  # DVC's outputs, even when there is nothing to put in them
        (out / folder).mkdir(parents=True, exist_ok=True)
    runs = tracking.finished_runs(cfg.tracking.uri, cfg.report.experiments)
    finished = len(runs)
    # A capped evaluation (budget=smoke) measures a few batches of val and test: not comparable, left out. A capped
    # training epoch is a budget like any other (the default pipeline's PTB run has one) and is reported.
    if not runs.empty and not cfg.report.include_capped and "params.trainer.max_eval_batches" in runs:
        runs = runs[runs["params.trainer.max_eval_batches"].isin(["None", None])]
    index = {
        "store": store_name(cfg),
        "experiments": cfg.report.experiments,
        "code": code_digest(),
        "runs": sorted(f"{r.run_id} {r.end_time}" for r in runs.itertuples()) if not runs.empty else [],
    }
    if up_to_date(out, index):
        log.info("report up to date: the same %d finished runs as last time (%s)", len(index["runs"]), out)
        return {}
    boards: dict[str, pd.DataFrame] = {}
    written: list[Path] = []
    sections = ["# rnnlab report", "", f"Runs from `{index['store']}` (experiments `{cfg.report.experiments}`)."]
    if runs.empty or "tags.dataset" not in runs:
        sections.append(
            f"\nNo comparable runs: {finished} finished run(s) had a capped evaluation (e.g. budget=smoke); "
            "report.include_capped=true reports them."
            if finished
            else "\nNo finished runs yet: train something first (`make run`)."
        )
    else:
        curves = tracking.metric_histories(cfg.tracking.uri, list(runs["run_id"]), CURVE_KEYS)
        searched = runs["tags.study"].notna() if "tags.study" in runs else pd.Series(False, index=runs.index)
        grouped = sorted(runs[~searched].groupby("tags.dataset"))
        reports = [write_dataset(name, group, curves, out) for name, group in grouped]
        boards = {r.name: r.board for r in reports}
        written = [path for r in reports for path in r.files]
        lines, rank_figures = render(reports, out)
        tuning_lines, tuning_files = write_tuning(*with_failed_trials(cfg, runs[searched], curves), out)
        sections += lines + tuning_lines
        written += rank_figures + tuning_files
    remove_stale(out, written)
    (out / "README.md").write_text("\n".join(sections) + "\n")
    data.write_json(out / INDEX, index)
    log.info("report for %s -> %s", sorted(boards), out)
    return boards


@hydra.main(config_path="../conf", config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (config.ConfigError, tracking.TrackingError) as err:
        log.error("%s", err)  # a config value or a store that cannot be used: the message says how to fix it
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
