"""Statistics over seeds: which differences between configurations are real.

Runs repeat a configuration when they share a ``config_id`` (everything that determines the result but the seed).
Per configuration: mean, standard deviation and a 95% t-interval of the test metric and of the best validation
metric. The best configuration is chosen on validation; every other one is compared with it on the test metric by a
paired t-test over the seeds both ran (Welch's t-test when they share fewer than ``MIN_SEEDS``), Holm-corrected for
the number of comparisons. Across datasets: average ranks, the Friedman test and a Nemenyi critical-difference
diagram (Demšar 2006). Pure functions on DataFrames: ``pipeline.report`` renders them, ``pipeline.tracking`` logs them.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import pandas as pd
import scikit_posthocs as sp
from scipy import stats
from statsmodels.stats.multitest import multipletests

from pipeline import cells
from pipeline.config import only_budget
from pipeline.objective import Objective, of_metric

CONFIDENCE = 0.95  # of every interval
ALPHA = 0.05  # family-wise error rate of the comparisons with the best (Holm)
MIN_SEEDS = 3  # fewer seeds: no p-value, "needs more seeds"
TEST = "paired t-test over matching seeds (Welch's t-test when fewer match), Holm-corrected, two-sided, alpha 0.05"
# Params that identify the cell (shown by its name) or never differ in a way worth a column.
NOT_VARYING = ("params.seed", "params.model.cell", "params.model.bidirectional")
NOT_IN_LABEL = ("params.model.param_budget",)  # a column of its own; the units it chose name the row
# Versions of what a run ran on, shown (8 characters) where runs otherwise alike differ in them: code and data.
VERSIONS = {"tags.cell_code": "cell_code", "tags.data_digest": "data"}


def interval(values: Any) -> dict[str, float]:
    """n, mean, sample standard deviation and the 95% t-interval of the mean (NaN where n is too small)."""
    x = np.asarray(pd.Series(values).dropna(), dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    if n > 1 and std > 0:
        low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=std / math.sqrt(n))
    elif n > 1:  # every seed gave the same value
        low = high = mean
    else:
        low = high = math.nan
    return {"n": n, "mean": mean, "std": std, "ci_low": float(low), "ci_high": float(high)}


def derived_config_id(row: pd.Series) -> str:
    """A run without a ``config_id`` tag (older runs): the same digest from its params, less the seed."""
    params = {k: row[k] for k in row.index if k.startswith("params.") and k != "params.seed" and pd.notna(row[k])}
    params["data_digest"] = row.get("tags.data_digest")
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def per_run(runs: pd.DataFrame, curves: pd.DataFrame, objective: Objective) -> pd.DataFrame:
    """One row per (configuration, seed): the newest run of each, its test metric, best validation metric (best
    epoch), seconds per epoch, size, cell and params."""
    runs = runs.reset_index(drop=True)
    ids = runs["tags.config_id"] if "tags.config_id" in runs else pd.Series([None] * len(runs))
    config_ids = [
        cid if isinstance(cid, str) and cid else derived_config_id(row)
        for cid, (_, row) in zip(ids, runs.iterrows(), strict=True)
    ]
    seconds = curves[curves["key"] == "perf/epoch_seconds"].groupby("run_id")["value"].mean()
    table = pd.DataFrame(
        {
            "run_id": runs["run_id"],
            "config_id": config_ids,
            "seed": pd.to_numeric(runs.get("params.seed", runs.get("tags.seed")), errors="coerce"),
            "cell": runs.get("tags.cell", pd.Series([""] * len(runs))).fillna(""),
            "params": pd.to_numeric(runs.get("tags.params_count"), errors="coerce"),
            "test": pd.to_numeric(runs.get(f"metrics.{objective.test}"), errors="coerce"),
            "end_time": runs.get("end_time"),
        }
    )
    table["best_val"] = table["run_id"].map(objective.best_val(curves))
    table["s_per_epoch"] = table["run_id"].map(seconds)
    for col in runs.columns:
        if col.startswith(("params.", "tags.anchor.", "tags.baseline.", "tags.preset", "tags.sweep", *VERSIONS)):
            table[col] = runs[col].values
    table = table.sort_values("end_time", kind="stable")  # a repeated seed counts once: its newest run
    return table.drop_duplicates(["config_id", "seed"], keep="last").reset_index(drop=True)


def varying_params(runs: pd.DataFrame) -> list[str]:
    """The params that differ between configurations (the seed and the cell's own columns aside)."""
    configs = runs.drop_duplicates("config_id")
    return sorted(  # sorted: a configuration's label is the same whatever order the store returned the columns in
        c
        for c in runs.columns
        if c.startswith("params.") and c not in NOT_VARYING and configs[c].astype(str).nunique() > 1
    )


def versioned(labels: pd.Series, firsts: pd.DataFrame) -> pd.Series:
    """Labels that two configurations share, told apart by the version (``VERSIONS``) they differ in: edited own
    cell code, rebuilt data (``SimpleRNN data=1111aaaa``)."""
    out = labels.copy()
    for _, same in firsts.groupby(labels, sort=False):
        for column, short in VERSIONS.items():
            if len(same) < 2 or column not in same or same[column].astype(str).nunique() < 2:
                continue
            for i, value in same[column].items():
                if not pd.isna(value):
                    out[i] = f"{out[i]}{', ' if ' ' in out[i] else ' '}{short}={str(value)[:8]}"
    return out


def cell_names(runs: pd.DataFrame) -> dict[Any, str]:
    """Each ``cell`` tag's name in tables: its display name (``LSTM``), or an own cell's import path where two cells
    share one (``cella:Cell`` and ``cellb:Cell``; ``LSTM`` and ``keras.layers:LSTM``)."""
    both = runs.groupby("cell")["params.model.bidirectional"].first() if "params.model.bidirectional" in runs else {}
    shown = {cell: cells.display(cell, _flag(both.get(cell))) for cell in runs["cell"].drop_duplicates()}
    clashing = {name for name in shown.values() if list(shown.values()).count(name) > 1}
    own = {cell for cell in shown if cells.is_path(str(cell))}
    return {cell: str(cell) if name in clashing and cell in own else name for cell, name in shown.items()}


def _flag(value: Any) -> bool | None:
    """A logged boolean param (``"True"``), or None where the run has none."""
    return None if value is None or pd.isna(value) else str(value) == "True"


def label(row: pd.Series, varying: list[str], shown: dict[Any, str] | None = None) -> str:
    """``GRU``, or ``GRU units=149`` where more than the cell varies. A setting and its resolved value that agree
    (``trainer.precision`` and ``precision``) show once; two different keys with one short name show in full.
    ``shown``: the cells' names (``cell_names``) where the run is one of a set."""
    cell = (shown or {}).get(row["cell"]) or cells.display(row["cell"])
    pieces: list[str] = []
    names: set[str] = set()
    for c in (c for c in varying if c not in NOT_IN_LABEL):
        short = c.split(".")[-1]
        piece = f"{short if short not in names else c.removeprefix('params.')}={row[c]}"
        if f"{short}={row[c]}" not in pieces:
            pieces.append(piece)
        names.add(short)
    return f"{cell} {', '.join(pieces)}".strip()


def aggregate(runs: pd.DataFrame, objective: Objective) -> pd.DataFrame:
    """One row per configuration, best (on mean best-validation, of those with ``MIN_SEEDS`` seeds) first: what
    varies, size, seeds, the test and validation metric (mean, std, 95% interval), seconds per epoch, and the verdict
    against the best."""
    varying, names = varying_params(runs), cell_names(runs)
    rows = []
    for config_id, group in runs.groupby("config_id", sort=False):
        first = group.iloc[-1]
        test, val = interval(group["test"]), interval(group["best_val"])
        rows.append(
            {
                "label": label(first, varying, names),
                "config_id": config_id,
                **{c.removeprefix("params."): first[c] for c in varying},
                "params": first["params"],
                "n": test["n"],
                "seeds": ",".join(str(int(s)) for s in sorted(group["seed"].dropna())),
                **{f"test_{k}": v for k, v in test.items() if k != "n"},
                **{f"val_{k}": v for k, v in val.items() if k != "n"},
                "s_per_epoch": group["s_per_epoch"].mean(),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    firsts = runs.groupby("config_id", sort=False).last().reindex(table["config_id"]).reset_index(drop=True)
    table["label"] = versioned(table["label"], firsts)
    table = table.sort_values("val_mean", ascending=not objective.higher, kind="stable", na_position="last")
    # The best is one a test can be made against: a stray run of one seed, lucky on validation, is ranked after.
    table = table.sort_values("n", key=lambda n: n < MIN_SEEDS, kind="stable")
    return judge(runs, table.reset_index(drop=True), objective)


def p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def compare_pair(runs: pd.DataFrame, config_id: str, best_id: str) -> tuple[float, str, tuple[float, float, float]]:
    """(p, how, (difference, low, high)) for one configuration against the best, on the test metric: paired over
    matching seeds when at least ``MIN_SEEDS`` match, else Welch's t-test; the mean difference (this minus the best)
    with its 95% interval, so a reader sees how large a difference the seeds rule out. NaNs when either side has
    fewer than ``MIN_SEEDS`` seeds."""
    a = runs[runs["config_id"] == config_id].set_index("seed")["test"].dropna()  # a seed without a test metric:
    b = runs[runs["config_id"] == best_id].set_index("seed")["test"].dropna()  # the pairs of the others
    common = a.index.intersection(b.index)
    if len(common) >= MIN_SEEDS:
        diff = a[common] - b[common]
        if np.allclose(diff, diff.iloc[0]):  # a constant difference: zero variance, t undefined
            d = float(diff.iloc[0])
            return (1.0 if d == 0 else 0.0), "paired", (d, d, d)
        result, mean = stats.ttest_rel(a[common], b[common]), float(diff.mean())
        how = "paired"
    elif len(a) >= MIN_SEEDS and len(b) >= MIN_SEEDS:
        result, mean = stats.ttest_ind(a, b, equal_var=False), float(a.mean() - b.mean())
        how = "Welch"
    else:
        return math.nan, "", (math.nan, math.nan, math.nan)
    ci = result.confidence_interval(CONFIDENCE)
    return float(result.pvalue), how, (mean, float(ci.low), float(ci.high))


def judge(runs: pd.DataFrame, table: pd.DataFrame, objective: Objective) -> pd.DataFrame:
    """Add ``p`` (Holm-adjusted), ``test`` (which test), ``diff_mean`` / ``diff_ci_low`` / ``diff_ci_high`` (the test
    metric minus the best's, 95% interval, not adjusted) and ``verdict`` to each row: "best", "not distinguishable
    from best (p = ...)", "worse (p = ...)", "better on test (p = ...)" or "needs >= 3 seeds"."""
    best_id = table["config_id"].iloc[0]
    tested = [compare_pair(runs, cid, best_id) for cid in table["config_id"].iloc[1:]]
    raw = [p for p, _, _ in tested]
    valid = [i for i, p in enumerate(raw) if not math.isnan(p)]
    adjusted = [math.nan] * len(raw)
    if valid:
        corrected = multipletests([raw[i] for i in valid], alpha=ALPHA, method="holm")[1]
        for i, p in zip(valid, corrected, strict=True):
            adjusted[i] = float(p)
    verdicts = ["best"]
    for p, (_, _, (difference, _, _)) in zip(adjusted, tested, strict=True):
        if math.isnan(p):
            verdicts.append(f"needs >= {MIN_SEEDS} seeds")
        elif p >= ALPHA:
            verdicts.append(f"not distinguishable from best ({p_text(p)})")
        elif objective.better(difference, 0.0):  # the direction of the difference tested (paired: over its seeds)
            verdicts.append(f"better on test ({p_text(p)})")
        else:
            verdicts.append(f"worse ({p_text(p)})")
    table["p"] = [math.nan, *adjusted]
    table["test"] = ["", *[how for _, how, _ in tested]]
    for i, key in enumerate(("diff_mean", "diff_ci_low", "diff_ci_high")):  # this minus the best, on test
        table[key] = [0.0, *[d[i] for _, _, d in tested]]
    table["verdict"] = verdicts
    return table


def headline(name: str, table: pd.DataFrame, objective: Objective) -> str:
    """One sentence a reader takes away, e.g. "imdb, 5 seeds each (test accuracy, mean ± std): GRU 0.846 ± 0.004
    and LSTM 0.842 ± 0.006 are not distinguishable; SimpleRNN is worse by 0.050 (p < 0.001)"."""
    if table.empty:
        return f"{name}: no finished runs."
    seeds = sorted(set(table["n"]))
    each = f"{seeds[0]} seed{'s' if seeds[0] > 1 else ''} each" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]} seeds"
    lead = f"{name}, {each} (test {objective.metric}, mean ± std)"
    digits = objective.headline_digits
    if len(table) == 1:
        return f"{lead}: {describe(table.iloc[0], digits)}; nothing to compare it with."
    if table["n"].iloc[0] < MIN_SEEDS:
        best = describe(table.iloc[0], digits)
        return f"{lead}: best on validation {best}; run at least {MIN_SEEDS} seeds to compare."
    tied = [describe(r, digits) for _, r in table.iloc[1:].iterrows() if r["verdict"].startswith("not distinguish")]
    best = describe(table.iloc[0], digits)
    parts = [f"{join([best, *tied])} are not distinguishable" if tied else f"{best} is best (chosen on validation)"]
    for _, r in table.iloc[1:].iterrows():
        gap = abs(r["diff_mean"])  # the difference the test was made on
        if r["verdict"].startswith(("worse", "better")):
            word = "worse" if r["verdict"].startswith("worse") else "better on test"
            parts.append(f"{r['label']} is {word} by {gap:.{digits}f} ({p_text(r['p'])})")
        elif r["verdict"].startswith("needs"):
            parts.append(f"{r['label']} needs {MIN_SEEDS}+ seeds")
    return f"{lead}: " + "; ".join(parts) + "."


def describe(row: pd.Series, digits: int = 3) -> str:
    std = "" if math.isnan(row["test_std"]) else f" ± {row['test_std']:.{digits}f}"
    return f"{row['label']} {row['test_mean']:.{digits}f}{std}"


def join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def bands(runs: pd.DataFrame, curves: pd.DataFrame, key: str) -> pd.DataFrame:
    """Per configuration and epoch: the mean of ``key`` over seeds and its 95% interval (columns config_id, epoch,
    n, mean, ci_low, ci_high)."""
    own = curves[(curves["key"] == key) & curves["run_id"].isin(runs["run_id"])]
    own = own.merge(runs[["run_id", "config_id"]], on="run_id")
    rows = [
        {"config_id": cid, "epoch": int(step) + 1, **interval(group["value"])}
        for (cid, step), group in own.groupby(["config_id", "step"])
    ]
    return pd.DataFrame(rows, columns=["config_id", "epoch", "n", "mean", "std", "ci_low", "ci_high"])


def anchors(runs: pd.DataFrame) -> pd.DataFrame:
    """Each preset with a published figure: ours (mean, 95% interval over its seeds) beside it, and whether it is
    reproduced (inside our interval), better or worse, by how much; no verdict from fewer than ``MIN_SEEDS`` seeds,
    as in the comparison tables. A preset run with other settings (its ``preset_changes`` tag) is not the published
    model: "not comparable"; at another budget only, the verdict says at which."""
    if "tags.anchor.value" not in runs:
        return pd.DataFrame()
    rows = []
    anchored = runs.dropna(subset=["tags.anchor.value"]).assign(preset=runs.get("tags.preset", ""))
    anchored["preset"] = anchored["preset"].fillna("")
    for (preset, _), group in anchored.groupby(["preset", "config_id"]):
        first = group.iloc[-1]
        metric = first["tags.anchor.metric"]
        higher = of_metric(metric).higher
        column = "test" if metric.startswith("test/") else "best_val"
        ours, published = interval(group[column]), float(first["tags.anchor.value"])
        said = group.get("tags.preset_changes", pd.Series([""] * len(group))).fillna("")
        changes = [] if (said == "").any() else str(said.iloc[-1]).split()  # a plain run too: nothing changed
        budget = bool(changes) and only_budget(changes)
        if changes and not budget:
            verdict = "not comparable: the preset with " + " ".join(changes)
        elif ours["n"] < MIN_SEEDS:
            verdict = f"needs >= {MIN_SEEDS} seeds"
        elif ours["ci_low"] <= published <= ours["ci_high"]:
            verdict = "reproduced"
        else:
            verdict = "better" if (ours["mean"] > published) == higher else "worse"
        if budget:
            verdict += f" (at {' '.join(changes)})"
        rows.append(
            {
                "preset": preset,
                "metric": metric if column == "test" else f"best {metric}",
                "published": published,
                "ours": ours["mean"],
                "ci_low": ours["ci_low"],
                "ci_high": ours["ci_high"],
                "n": ours["n"],
                "gap": ours["mean"] - published,
                "verdict": verdict,
                "source": first["tags.anchor.source"],
                "url": first.get("tags.anchor.url"),
            }
        )
    return pd.DataFrame(rows)


def cell_ranks(tables: dict[str, pd.DataFrame], objectives: dict[str, Objective]) -> dict[str, Any] | None:
    """Cells ranked on every dataset where each of them has results (each cell's configuration chosen on validation,
    ranked on its mean test metric; 1 = best), their average ranks, the Friedman test and Nemenyi's pairwise p-values.
    None when fewer than 3 datasets or 3 cells are in common."""
    scores = {}
    for name, table in tables.items():
        by_cell = table.assign(cell=table["label"].str.split(" ").str[0]).drop_duplicates("cell")  # best val first
        scores[name] = by_cell.set_index("cell")["test_mean"] * (1 if objectives[name].higher else -1)
    frame = pd.DataFrame(scores).T  # datasets x cells, higher = better
    frame = frame[frame.notna().sum(axis=1) >= 3].dropna(axis=1)  # datasets with 3+ cells; the cells all of them ran
    if frame.shape[0] < 3 or frame.shape[1] < 3:
        return None
    ranks = frame.rank(axis=1, ascending=False)
    friedman = stats.friedmanchisquare(*[frame[c] for c in frame.columns])
    nemenyi = sp.posthoc_nemenyi_friedman(frame.to_numpy())
    nemenyi.index = nemenyi.columns = frame.columns
    return {
        "ranks": ranks,
        "average": ranks.mean().sort_values(),
        "friedman_statistic": float(friedman.statistic),
        "friedman_p": float(friedman.pvalue),
        "nemenyi": nemenyi,
    }


# --- tuning budget: expected best validation metric vs trials (Dodge et al. 2019) ------------------------------------

BOOTSTRAP_RESAMPLES = 2000  # resamples of the trials for the band
TUNING = (
    "expected best validation metric of n trials (Dodge et al. 2019, 'Show Your Work'), from each cell's trials, "
    "which the estimate takes for independent draws: exact for the random sampler, an approximation for TPE (its "
    "later trials depend on the earlier ones); band: 95% percentile bootstrap over the trials"
)


def completed(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs less pruned search trials (they stopped early: no test metric, not a result to compare)."""
    if "tags.trial_state" not in runs:
        return runs
    return runs[runs["tags.trial_state"] != "PRUNED"].reset_index(drop=True)


def _expected_best(sample: np.ndarray, axis: int = -1, higher: bool = True) -> np.ndarray:
    """E[best of n draws] for n = 1..N of the N values along ``axis`` (with replacement, as the estimator assumes):
    sum_i v_(i) [(i/N)^n - ((i-1)/N)^n] over the values sorted worst to best; shape (N, ...)."""
    values = np.moveaxis(np.asarray(sample, dtype=float), axis, -1)
    values = np.sort(values if higher else -values, axis=-1)
    size = values.shape[-1]
    i = np.arange(1, size + 1) / size
    n = np.arange(1, size + 1)[:, None]
    weights = i[None, :] ** n - (i[None, :] - 1 / size) ** n  # (n, i)
    curve = np.moveaxis(values @ weights.T, -1, 0)
    return curve if higher else -curve


def expected_best(values: Any, higher: bool, seed: int = 0) -> pd.DataFrame:
    """The expected-best curve of one cell's trials with its bootstrap band: columns n, expected, low, high."""
    x = np.asarray(pd.Series(values).dropna(), dtype=float)
    if len(x) == 0:
        return pd.DataFrame(columns=["n", "expected", "low", "high"])
    curve = _expected_best(x, higher=higher)
    if len(x) > 1 and np.ptp(x) > 0:
        band = stats.bootstrap(
            (x,),
            lambda s, axis: _expected_best(s, axis=axis, higher=higher),
            vectorized=True,
            n_resamples=BOOTSTRAP_RESAMPLES,
            confidence_level=CONFIDENCE,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
        low, high = band.low, band.high
    else:
        low = high = curve
    return pd.DataFrame({"n": np.arange(1, len(x) + 1), "expected": curve, "low": low, "high": high})


def trials(runs: pd.DataFrame, curves: pd.DataFrame, objective: Objective) -> pd.DataFrame:
    """One row per search trial (runs tagged with a study): sweep, study, cell, trial number, state, best
    validation metric (a pruned trial's best before it stopped)."""
    if "tags.study" not in runs:
        return pd.DataFrame()
    found = runs[runs["tags.study"].notna()].reset_index(drop=True)
    return pd.DataFrame(
        {
            "sweep": found.get("tags.sweep", pd.Series([""] * len(found))).fillna(""),
            "study": found["tags.study"],
            "cell": found.get("tags.cell"),
            "trial": pd.to_numeric(found["tags.trial"], errors="coerce"),
            "state": found.get("tags.trial_state", pd.Series([None] * len(found)))
            .where(found.get("status", pd.Series(["FINISHED"] * len(found))) != "FAILED", "FAILED")
            .fillna("COMPLETE"),
            "best_val": found["run_id"].map(objective.best_val(curves)),
            "run_id": found["run_id"],
            **{c: found[c] for c in found.columns if c.startswith("params.") and c != "params.seed"},
        }
    ).drop_duplicates(["study", "trial"], keep="last")


def trial_values(group: pd.DataFrame, objective: Objective) -> pd.Series:
    """A study's trial results for the expected-best curve: a FAILED (diverged) trial counts, as the study's worst
    value (leaving it out would flatter a cell that is hard to tune)."""
    values = group["best_val"].where(group["state"] != "FAILED")
    worst = values.min() if objective.higher else values.max()
    return values.where(group["state"] != "FAILED", worst)


def tuning_curves(table: pd.DataFrame, objective: Objective) -> dict[str, pd.DataFrame]:
    """Per study (one per cell in a tune_cells_* sweep): its expected-best curve and band."""
    return {
        study: expected_best(trial_values(group, objective), objective.higher)
        for study, group in table.groupby("study", sort=True)
    }


def _short(value: Any) -> str:
    """A param as logged (text), numbers to 4 significant digits."""
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def tuning_summary(table: pd.DataFrame, objective: Objective) -> pd.DataFrame:
    """Per study: trials, pruned, best trial and its value, expected best at 1 and at all trials."""
    rows = []
    for study, group in table.groupby("study", sort=True):
        curve = expected_best(trial_values(group, objective), objective.higher)
        ranked = group[~group["state"].isin(["FAILED", "PRUNED"])].dropna(subset=["best_val"])  # as Optuna ranks them
        ranked = ranked.sort_values(["best_val", "trial"], ascending=[not objective.higher, True], kind="stable")
        best = ranked.iloc[0] if len(ranked) else None
        searched = [c for c in group.columns if c.startswith("params.") and group[c].astype(str).nunique() > 1]
        chosen = "" if best is None else ", ".join(f"{c.split('.', 1)[1]}={_short(best[c])}" for c in searched)
        rows.append(
            {
                "study": study,
                "cell": cells.display(group["cell"].iloc[0]),
                "trials": len(group),
                "pruned": int((group["state"] == "PRUNED").sum()),
                "failed": int((group["state"] == "FAILED").sum()),
                "best_trial": None if best is None else int(best["trial"]),
                "best_val": None if best is None else float(best["best_val"]),
                "best_params": chosen,
                "expected_at_1": float(curve["expected"].iloc[0]) if len(curve) else math.nan,
                "expected_at_all": float(curve["expected"].iloc[-1]) if len(curve) else math.nan,
            }
        )
    return pd.DataFrame(rows)
