"""Published results: the seeded studies behind README's claims, in ``docs/results/``, apart from the user's
``reports/`` (which ``make run`` and a user's sweeps rewrite).

python -m pipeline.results                          # every study, trained from scratch (hours; README states each)
python -m pipeline.results results.study=cells_ptb  # one study
python -m pipeline.results results.train=false      # re-render the reports from the studies' stores

Each study trains into its own MLflow store (``<dir>/<study>/mlflow.db``, not committed), renders its report beside
it and records how it was made in ``study.json`` (commands, commit, CPU, date, minutes). The index ``README.md`` lists
the studies and ranks the cells over all their datasets.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import yaml
from omegaconf import DictConfig

from pipeline import config, data, figures, speed, tracking
from pipeline.data import registry
from pipeline.objective import Objective, for_kind

log = logging.getLogger(__name__)

config.register()

STUDY_FILE = "study.json"  # how a study was made
STORE = "mlflow.db"  # a study's own MLflow store, in its folder (git-ignored)


class StudyError(RuntimeError):
    """A study that cannot run: an unknown name or a failed command."""


def store_uri(folder: Path) -> str:
    return f"sqlite:///{folder.resolve() / STORE}"


def train_commands(runs: list[str], folder: Path) -> list[list[str]]:
    """Each study line as a ``python -m pipeline.train`` argv writing to the study's own store (models not logged:
    the published results are the metrics)."""
    store = [f"tracking.uri={store_uri(folder)}", f"tracking.artifact_location={folder.resolve() / 'mlartifacts'}"]
    return [
        [sys.executable, "-m", "pipeline.train", *shlex.split(line), *store, "tracking.log_model=false"]
        for line in runs
    ]


def train(name: str, study: DictConfig, folder: Path, root: Path) -> dict[str, Any]:
    """Run the study from scratch (its old store removed) and return how it was made."""
    (folder / STORE).unlink(missing_ok=True)
    shutil.rmtree(folder / "mlartifacts", ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    commit, dirty = tracking.git_state(root)
    started, clock = datetime.now(UTC), time.monotonic()
    for argv in train_commands(list(study.runs), folder):
        log.info("study %s: %s", name, shlex.join(argv[1:]))
        if subprocess.run(argv, cwd=root).returncode != 0:
            raise StudyError(f"study {name!r}: `{shlex.join(argv[1:])}` failed; its runs say why (make ui)")
    return {
        "study": name,
        "title": study.title,
        "commands": [f"python -m pipeline.train {line}" for line in study.runs],
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "cpu": f"{speed.cpu_model()}; {speed.cpu_flags()}",
        "date": started.strftime("%Y-%m-%d"),
        "minutes": round((time.monotonic() - clock) / 60, 1),
    }


def render(name: str, folder: Path, root: Path) -> None:
    """The study's report, from its store, into its folder (the report stage, as its own process)."""
    argv = [sys.executable, "-m", "pipeline.report", f"paths.reports={folder.resolve()}"]
    argv.append(f"tracking.uri={store_uri(folder)}")
    if subprocess.run(argv, cwd=root).returncode != 0:
        raise StudyError(f"study {name!r}: its report failed (see the log above)")


def cells_in(table: pd.DataFrame) -> set[str]:
    """The cells a comparison table compares (its labels start with the cell's name)."""
    return set(table["label"].str.split(" ").str[0])


def dataset_tables(folder: Path) -> tuple[dict[str, pd.DataFrame], dict[str, Objective]]:
    """Each dataset's aggregated comparison (``<study>/comparisons/<dataset>.csv``) and its objective. Where two
    studies ran a dataset, the one that compares more of the cells every compared dataset has (so that a study of
    other cells, such as the LSTM's variants, leaves the ranking over all datasets whole), then the one with more
    configurations. A dataset with one cell only (a preset over seeds) is not compared, so it does not count."""
    found: dict[str, list[pd.DataFrame]] = {}
    for path in sorted(folder.glob("*/comparisons/*.csv")):
        if not path.stem.startswith("tuning_"):
            found.setdefault(path.stem, []).append(pd.read_csv(path))
    ranked = [set().union(*map(cells_in, t)) for t in found.values()]
    ranked = [cells for cells in ranked if len(cells) > 1]  # a one-cell dataset (a preset's seeds) ranks nothing
    shared = set.intersection(*ranked) if ranked else set()
    tables = {name: max(t, key=lambda table: (len(cells_in(table) & shared), len(table))) for name, t in found.items()}
    return tables, {name: for_kind(registry.kind_of(source_of(name))) for name in tables}


DATA_CONF = config.ROOT / "conf" / "data"


def source_of(name: str, conf: Path = DATA_CONF) -> str:
    """The registry source a dataset's name comes from: its ``conf/data`` file's ``source``, following the file's
    defaults (``pmnist`` -> ``smnist`` -> ``mnist``), or for a name set on the command line
    (``data.name=adding_t50``) the longest source it starts with."""
    seen = set()
    while (path := conf / f"{name}.yaml").exists() and name not in seen:
        seen.add(name)
        spec = yaml.safe_load(path.read_text()) or {}
        if "source" in spec:
            return spec["source"]
        parents = [d for d in spec.get("defaults", []) if isinstance(d, str) and d != "_self_"]
        name = parents[0] if parents else name
    starts = [source for source in registry.sources() if name.startswith(source)]
    if not starts:
        raise ValueError(f"dataset {name!r}: no conf/data/{name}.yaml and no known source it starts with")
    return max(starts, key=len)


def section(readme: Path, title: str) -> list[str]:
    """The lines of one ``## title`` section of a study's README (empty when it has none)."""
    lines = readme.read_text().splitlines() if readme.exists() else []
    if f"## {title}" not in lines:
        return []
    start = lines.index(f"## {title}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end]).strip().splitlines()


def study_row(made: dict[str, Any]) -> dict[str, str]:
    commands = "<br>".join(f"`{c}`" for c in made["commands"])
    minutes = f"{made['minutes']:.0f} min" if made.get("minutes") is not None else "not recorded"
    return {
        "study": f"[{made['study']}]({made['study']}/README.md)",
        "what": made["title"],
        "commands": commands,
        "commit": " ".join([made["commit"].split(" ")[0][:12], *made["commit"].split(" ")[1:]]),
        "CPU": made["cpu"],
        "date": made["date"],
        "run time": minutes,
    }


def index_lines(folder: Path, figures_out: Path) -> list[str]:
    """``README.md`` of the published results: the studies and how each was made, their headlines and published
    numbers, and the cells ranked over every dataset of every study (its diagram written to ``figures_out``)."""
    made = [json.loads(p.read_text()) for p in sorted(folder.glob(f"*/{STUDY_FILE}"))]
    lines = [
        "# rnnlab published results",
        "",
        "The project's own seeded studies, behind README's claims. `make results` trains them all again from scratch",
        "(`make results STUDY=<name>` one of them); a user's `make run` and sweeps write `reports/`, never here.",
        "Floating-point results differ between CPU instruction sets (AVX2, AVX-512, bfloat16), so a rerun on another",
        "kind of machine gives other numbers within the intervals, not the same digits.",
        "",
        "## Studies",
        "",
        pd.DataFrame([study_row(m) for m in made]).to_markdown(index=False) if made else "No study yet.",
        "",
        *[f"- {m['study']}: {m['note']}" for m in made if m.get("note")],
        "",
        "Speed: `speed/` holds `make bench` and `make profile` as measured on the CPU each file names (they write",
        "`reports/`; copy them here to publish).",
    ]
    for m in made:
        readme = folder / m["study"] / "README.md"
        lines += ["", f"## {m['study']}: headlines", "", *section(readme, "Headlines")]
        if anchors := section(readme, "Published numbers beside ours"):
            lines += ["", f"### {m['study']}: published numbers beside ours", "", *anchors]
    ranks, _ = figures.cell_ranks_section(*dataset_tables(folder), figures_out)
    return lines + ranks


def write_index(folder: Path) -> Path:
    index = folder / "README.md"
    index.write_text("\n".join(index_lines(folder, folder / "figures")) + "\n")
    return index


def run(cfg: DictConfig) -> Path:
    """Train and render the chosen studies (or only render, ``results.train=false``), then write the index."""
    config.validate(cfg, "results")
    folder, root = Path(cfg.results.dir), Path(cfg.paths.root)
    chosen = cfg.results.study
    if chosen is not None and chosen not in cfg.studies:
        raise StudyError(f"results.study={chosen!r} is no study; choose one of: {', '.join(cfg.studies)}")
    for name in list(cfg.studies) if chosen is None else [chosen]:
        own = folder / name
        if cfg.results.train:
            data.write_json(own / STUDY_FILE, train(name, cfg.studies[name], own, root))
        if (own / STORE).exists():
            render(name, own, root)
        else:
            log.info("study %s: no store to render from; its committed report is kept", name)
    return write_index(folder)


@hydra.main(config_path="../conf", config_name="results", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        log.info("published results -> %s", run(cfg))
    except (StudyError, config.ConfigError, tracking.TrackingError) as err:
        log.error("%s", err)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
