"""Figures and sections that more than one stage renders: the report and the published results both show the cells
ranked across datasets with the same test and the same diagram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd
import scikit_posthocs as sp

from pipeline import compare
from pipeline.objective import Objective

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

CD_FIGURE = "cells_critical_difference.png"


def save(fig: Any, path: Path) -> Path:
    """Write ``fig`` to ``path`` (folders made) and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def cell_ranks_section(
    tables: dict[str, pd.DataFrame], objectives: dict[str, Objective], figures: Path
) -> tuple[list[str], list[Path]]:
    """Average ranks of the cells over the datasets where all of them ran, the Friedman test and a Nemenyi
    critical-difference diagram written under ``figures``; nothing when fewer than 3 datasets share 3 cells."""
    ranked = compare.cell_ranks(tables, objectives)
    if ranked is None:
        return [], []
    fig, ax = plt.subplots(figsize=(8, 2.8))
    sp.critical_difference_diagram(ranked["average"], ranked["nemenyi"], ax=ax)
    ax.set_title("average rank over datasets (1 = best); a bar joins cells Nemenyi cannot separate", fontsize=9)
    path = save(fig, figures / CD_FIGURE)
    table = ranked["ranks"].copy()
    table.loc["average rank"] = ranked["average"]
    lines = [
        "",
        "## Cells across datasets",
        "",
        f"Each cell's configuration chosen on validation, ranked on its mean test metric per dataset (1 = best). "
        f"Friedman test over {len(ranked['ranks'])} datasets: chi2 = {ranked['friedman_statistic']:.2f}, "
        f"{compare.p_text(ranked['friedman_p'])}.",
        "",
        table.round(2).to_markdown(),
        "",
        f"![{path.stem}](figures/{path.name})",
    ]
    return lines, [path]


def anchors_section(anchors: pd.DataFrame) -> list[str]:
    """The published numbers beside ours, each source a link where it has a URL."""
    if anchors.empty:
        return []
    shown = anchors.copy()
    linked = zip(shown["source"], shown.pop("url"), strict=True)  # compare.anchors gives every row its url (or None)
    shown["source"] = [f"[{s}]({u})" if isinstance(u, str) and u else s for s, u in linked]
    table = shown.round(4).astype(object).where(shown.notna(), "–").to_markdown(index=False)  # one seed: no interval
    return ["", "## Published numbers beside ours", "", table]
