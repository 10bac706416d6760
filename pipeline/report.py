"""Report stage: MLflow runs -> leaderboards (Markdown, CSV) and plots (PNG) under ``reports/``.

python -m pipeline.report                      # every finished run in the local store
python -m pipeline.report report.include_capped=true   # runs with a capped evaluation (budget=smoke) too
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import matplotlib
import pandas as pd
from omegaconf import DictConfig

from pipeline import config, data, tracking
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
CURVE_KEYS = ["val/loss", "val/accuracy", "val/perplexity", "perf/epoch_seconds"]


def objective(runs: pd.DataFrame) -> tuple[str, bool]:
    """The metric that ranks a dataset's runs and whether higher is better: perplexity for a language model."""
    if "metrics.test/perplexity" in runs and runs["metrics.test/perplexity"].notna().any():
        return "perplexity", False
    return "accuracy", True


def leaderboard(runs: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """One row per run: cell, key hyper-parameters, size, best validation and test metric, epochs, time."""
    metric, higher = objective(runs)
    table = pd.DataFrame({name: runs.get(col) for name, col in COLUMNS.items()})
    table["sweep"] = table["sweep"].fillna("")
    val = curves[curves["key"] == f"val/{metric}"].groupby("run_id")["value"]
    table[f"best val {metric}"] = table["run_id"].map(val.max() if higher else val.min())
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


def plot_curves(name: str, table: pd.DataFrame, curves: pd.DataFrame, out: Path) -> Path:
    """Validation loss and the task metric per epoch, one line per run, labelled by cell."""
    metric, _ = objective_from_curves(curves)
    keys = ["val/loss", f"val/{metric}"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = dict(zip(table["run_id"], table["cell"] + " (" + table["run"].astype(str) + ")", strict=True))
    for ax, key in zip(axes, keys, strict=True):
        for run_id, group in curves[curves["key"] == key].groupby("run_id"):
            if run_id in labels:
                ax.plot(group["step"] + 1, group["value"], marker="o", label=labels[run_id])
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{name}: validation loss")
    axes[1].set_title(f"{name}: validation {metric}")
    axes[1].legend(fontsize=7)
    return save(fig, out / f"{name}_curves.png")


def objective_from_curves(curves: pd.DataFrame) -> tuple[str, bool]:
    return ("perplexity", False) if (curves["key"] == "val/perplexity").any() else ("accuracy", True)


def plot_size_and_speed(name: str, table: pd.DataFrame, out: Path) -> list[Path]:
    """Final test metric against parameter count, and mean time per epoch per cell."""
    metric = next(c for c in table.columns if c.startswith("test "))
    fig, ax = plt.subplots(figsize=(6, 4))
    for cell, group in table.groupby("cell"):
        ax.scatter(group["params"].astype(float), group[metric], label=cell, s=40)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.set_title(f"{name}: {metric} vs size")
    ax.grid(alpha=0.3)
    ax.legend()
    paths = [save(fig, out / f"{name}_size.png")]
    fig, ax = plt.subplots(figsize=(6, 4))
    speed = table.groupby("cell")["s/epoch"].mean().sort_values()
    ax.barh(speed.index, speed.values)
    ax.set_xlabel("seconds per epoch (mean over runs)")
    ax.set_title(f"{name}: time per epoch")
    paths.append(save(fig, out / f"{name}_speed.png"))
    return paths


def save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# The files the report writes, by folder: a report run owns every file matching these and nothing else there.
OWNED = {
    "leaderboards": ("*.md", "*.csv"),
    "curves": ("*.csv",),
    "figures": ("*_curves.png", "*_size.png", "*_speed.png"),
}


def write_dataset(name: str, runs: pd.DataFrame, curves: pd.DataFrame, out: Path) -> tuple[pd.DataFrame, list[Path]]:
    """One dataset's leaderboard (Markdown, CSV), curves (CSV) and figures; return the table and the files."""
    table = leaderboard(runs.reset_index(drop=True), curves)
    files = [out / "leaderboards" / f"{name}.csv", out / "leaderboards" / f"{name}.md", out / "curves" / f"{name}.csv"]
    table.to_csv(files[0], index=False)
    files[1].write_text(table.to_markdown(index=False) + "\n")
    own = curves[curves["run_id"].isin(table["run_id"])].copy()
    own["cell"] = own["run_id"].map(dict(zip(table["run_id"], table["cell"], strict=True)))
    wide = own.pivot_table(index=["run_id", "cell", "step"], columns="key", values="value").reset_index()
    wide.insert(3, "epoch", wide.pop("step") + 1)
    wide.to_csv(files[2], index=False)
    files += [plot_curves(name, table, own, out / "figures"), *plot_size_and_speed(name, table, out / "figures")]
    return table, files


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


def up_to_date(out: Path, index: dict) -> bool:
    """The report in ``out`` was made from exactly these runs and all its files are there: nothing to redo."""
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
        for name, group in sorted(runs.groupby("tags.dataset"), key=lambda item: item[0]):
            table, files = write_dataset(name, group, curves, out)
            boards[name], written = table, written + files
            sections += [f"\n## {name}\n", table.drop(columns=["run_id"]).to_markdown(index=False), ""]
            sections += [f"![{p.stem}](figures/{p.name})" for p in files if p.suffix == ".png"]
    remove_stale(out, written)
    (out / "README.md").write_text("\n".join(sections) + "\n")
    data.write_json(out / INDEX, index)
    log.info("report for %s -> %s", sorted(boards), out)
    return boards


@hydra.main(config_path="../conf", config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
