"""Sweeps: the command-line forms that expand into Hydra multiruns.

``seeds=N`` repeats every configuration of a sweep (named, or a hand-written grid) with seeds 1..N: the same seeds
for every configuration, so runs pair up by seed (same initial weights draw, same data order) and
``pipeline.compare`` can test differences over seeds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
from pathlib import Path

from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from pipeline.redaction import redact

log = logging.getLogger(__name__)

MAX_SEEDS = 1000
_SEEDS = re.compile(r"\+?seeds=(?P<value>.*)")


class SweepError(ValueError):
    """A sweep option that cannot work; the message says how to write it."""


def expand_seeds(argv: list[str]) -> list[str]:
    """``seeds=N`` -> ``seed=1,...,N`` (and multirun mode); every other argument unchanged."""
    found = [(i, m) for i, a in enumerate(argv) if (m := _SEEDS.fullmatch(a))]
    if not found:
        return argv
    if len(found) > 1:
        raise SweepError("seeds= is given more than once; give it once, e.g. seeds=5")
    index, match = found[0]
    value = match["value"]
    if not value.isdigit() or not 1 <= int(value) <= MAX_SEEDS:
        raise SweepError(f"seeds must be a whole number of seeds from 1 to {MAX_SEEDS} (seeds 1..N), got {value!r}")
    if any(a.lstrip("+~").startswith("seed=") for a in argv):
        raise SweepError("give either seeds=N (seeds 1..N) or seed=a,b,c, not both")
    expanded = [*argv[:index], "seed=" + ",".join(str(s) for s in range(1, int(value) + 1)), *argv[index + 1 :]]
    if not {"-m", "--multirun"} & set(argv) and not any(a.startswith("hydra.mode=") for a in argv):
        expanded.append("hydra.mode=MULTIRUN")
    return expanded


# --- resuming a sweep ----------------------------------------------------------------------------------------------

RESUME_MODES = ("auto", "true", "false")
# Overrides that say how to run a sweep, not what it runs: a resumed sweep may change them and is the same sweep.
KEY_IGNORES = ("sweep.", "hydra", "search.", "trainer.verbose", "trainer.intra_op", "trainer.inter_op")


def resume_mode(value: object) -> str:
    """``sweep.resume`` normalised: auto (continue an unfinished sweep of the same definition, else start one),
    true (continue one, or fail), false (always start a new one)."""
    mode = str(value).strip().lower()
    if mode not in RESUME_MODES:
        raise SweepError(f"sweep.resume must be one of {', '.join(RESUME_MODES)}, got {value!r}")
    return mode


def sweep_key(overrides: dict[str, str]) -> str:
    """What makes two sweep commands the same sweep: their overrides and sweep parameters, less how they run."""
    kept = {k: v for k, v in overrides.items() if not k.startswith(KEY_IGNORES)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


# --- a search: Optuna trials as Hydra jobs --------------------------------------------------------------------------

PRUNED = "PRUNED"  # what a pruned job returns to the sweeper (a float would read as a result)
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("auto", "maximize", "minimize")
SAMPLERS = ("tpe", "random")


class Pruned(Exception):
    """The study's pruner stopped this trial: it ends early, and that is not a failure."""

    def __init__(self, epoch: int, value: float):
        super().__init__(f"pruned after epoch {epoch + 1} (objective {value:.4g})")
        self.epoch, self.value = epoch, value


def objective_key(metrics: dict[str, float]) -> str:
    """The validation metric a search optimises: perplexity for a language model, else accuracy."""
    return "val/perplexity" if "val/perplexity" in metrics else "val/accuracy"


def best_objective(history: list[dict[str, float]]) -> float:
    """The best epoch's validation metric (the model early stopping would keep): a trial's result."""
    if not history:
        return float("nan")
    key = objective_key(history[0])
    values = [h[key] for h in history if key in h and math.isfinite(h[key])]
    if not values:
        return float("nan")
    return min(values) if key == "val/perplexity" else max(values)


def study_storage(search: DictConfig, tracking_uri: str) -> str:
    """Where studies persist. ``auto``: an Optuna journal file beside a sqlite MLflow store
    (``mlflow.db`` -> ``mlflow-optuna.journal``); with a tracking server, the team server's PostgreSQL."""
    if search.storage != "auto":
        return str(search.storage)
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return f"journal:{db.with_name(db.stem + '-optuna.journal')}"
    from pipeline.server import DEFAULT_DIR, ServerError, TeamServer

    try:
        return TeamServer.load(DEFAULT_DIR).search_storage
    except ServerError:
        raise SweepError(
            f"search.storage=auto finds no storage for tracking at {redact(tracking_uri)}: set search.storage "
            "(or RNNLAB_SEARCH_STORAGE) to your team's Optuna storage URL, e.g. postgresql+psycopg2://user@host/optuna"
        ) from None


def open_storage(url: str):
    """An Optuna storage from a URL; ``journal:<file>`` is a journal file (safe for parallel processes)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    return optuna.storages.RDBStorage(url)


def make_pruner(search: DictConfig, epochs: int):
    """The pruner ``search.pruner`` names; every process that reports to a study builds the same one."""
    import optuna

    kind = str(search.pruner)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials, n_warmup_steps=search.warmup_epochs)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, search.warmup_epochs), max_resource=max(1, epochs))
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise SweepError(f"search.pruner must be one of {', '.join(PRUNERS)}, got {kind!r}")


class TrialLink:
    """A search trial seen from its training job: reports each epoch's validation metric to the study and says
    when the pruner stops the trial."""

    def __init__(self, search: DictConfig, tracking_uri: str, epochs: int):
        import optuna

        self.storage = open_storage(study_storage(search, tracking_uri))
        self.study = optuna.load_study(
            study_name=search.study, storage=self.storage, pruner=make_pruner(search, epochs)
        )
        study_id = self.storage.get_study_id_from_name(search.study)
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, search.trial)
        self.trial = optuna.Trial(self.study, trial_id)
        self.number = int(search.trial)

    def report(self, epoch: int, metrics: dict[str, float]) -> None:
        """Report the epoch; raise ``Pruned`` when the pruner says stop."""
        key = objective_key(metrics)
        check_direction(self.study, "minimize" if key == "val/perplexity" else "maximize")
        value = metrics.get(key, float("nan"))
        if not math.isfinite(value):
            return  # a diverged epoch is the run's failure to report, not the pruner's decision
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise Pruned(epoch, value)


def make_sampler(sampler: DictConfig, seed: int):
    """A fresh sampler for one ask, seeded from the trial's index: a resumed search draws what an uninterrupted one
    would have, and with ``random`` every cell gets the same draws (a paired design)."""
    import optuna

    kind = str(sampler.kind)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=sampler.startup_trials)
    raise SweepError(f"hydra.sweeper.sampler.kind must be one of {', '.join(SAMPLERS)}, got {kind!r}")


def _distribution(override):
    """An Optuna distribution for a Hydra sweep override: choice(...) -> categorical, interval(a, b) -> uniform
    (tag(log, ...) -> log-uniform; ints stay ints), range(a, b[, step]) -> a stepped int or float."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    if isinstance(value, RangeSweep):
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(value.start, value.stop - 1, step=value.step)
        return CategoricalDistribution(list(override.sweep_iterator()))  # Hydra's values exactly: stop excluded
    raise SweepError(f"{override.input_line}: an Optuna search takes choice(), interval() or range(), not this form")


def search_space(lines: list[str]) -> tuple[dict, list[list[str]], list[str]]:
    """Split sweep parameters into the search space (``{key: distribution}``), the grid (``a,b,c`` lists: every
    value gets the same number of trials) and fixed overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space, grid, fixed = {}, [], []
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed.append(override.input_line)
        elif override.is_choice_sweep() and override.value().simple_form:
            grid.append([f"{key}={v}" for v in override.sweep_iterator()])
        else:
            space[key] = _distribution(override)
    return space, [list(p) for p in itertools.product(*grid)], fixed


class OptunaSweeper(Sweeper):
    """A Hydra sweeper running a persistent Optuna study per grid point (``hydra/sweeper=optuna``): ``n_trials``
    trials for each, ``n_jobs`` at a time through the configured launcher. Re-running the same command continues the
    same studies: trials a killed process left RUNNING run again under their own numbers (their MLflow runs resume
    from checkpoints), then new ones until every study holds ``n_trials``."""

    def __init__(self, direction: str, n_trials: int, n_jobs: int, study_name: str | None, sampler, params) -> None:
        if direction not in DIRECTIONS:
            raise SweepError(f"hydra.sweeper.direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        if n_trials < 1 or n_jobs < 1:
            raise SweepError(f"hydra.sweeper.n_trials and n_jobs must be at least 1, got {n_trials} and {n_jobs}")
        self.direction, self.n_trials, self.n_jobs = direction, n_trials, n_jobs
        self.study_name, self.sampler, self.params = study_name, sampler, params or {}
        self.config = self.launcher = None
        self.job_idx = 0

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def resolved_direction(self) -> str:
        """``auto``: minimise perplexity (a language model), maximise accuracy; a stated direction must agree."""
        from pipeline.config import DATA_KINDS

        wanted = "minimize" if DATA_KINDS[self.config.data.source] == "language_model" else "maximize"
        if self.direction not in ("auto", wanted):
            metric = "val/perplexity" if wanted == "minimize" else "val/accuracy"
            raise SweepError(f"hydra.sweeper.direction={self.direction}, but the trials report {metric}: use {wanted}")
        return wanted

    def base_name(self) -> str:
        from pipeline.tracking import sweep_overrides

        if self.study_name:
            return str(self.study_name)
        key = sweep_key(sweep_overrides(self.config.hydra))
        return f"{self.config.tracking.sweep_name or 'search'}-{key[:8]}"

    def sweep(self, arguments: list[str]) -> list:
        import optuna

        lines = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        space, points, fixed = search_space(lines)
        if not space:
            raise SweepError("an Optuna search needs a search space: add choice(), interval() or range() parameters")
        search = self.config.search
        url = study_storage(search, self.config.tracking.uri)
        fixed.append(f"search.storage='{url}'")  # the jobs use the storage resolved here, wherever they run
        storage = open_storage(url)
        pruner = make_pruner(search, self.config.trainer.epochs)
        direction = self.resolved_direction()
        studies = []
        for point in points:
            name = " ".join([self.base_name(), *point])
            study = optuna.create_study(
                study_name=name, storage=storage, direction=direction, pruner=pruner, load_if_exists=True
            )
            check_direction(study, "minimize" if direction == "minimize" else "maximize")
            stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
            done = len(study.trials) - len(stale)
            log.info("study %r: %d of %d trials done, %d to run again", name, done, self.n_trials, len(stale))
            studies.append((point, study, stale))
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, turn = [], 0
        while batch := self._batch(studies, space, fixed, turn):
            turn += len(batch)
            results = self.launcher.launch([overrides for _, _, overrides in batch], initial_job_idx=self.job_idx)
            self.job_idx += len(batch)
            for (study, number, _), result in zip(batch, results, strict=True):
                self._tell(study, number, result)
            returns.append(results)
        if not returns:
            log.info("nothing to run: every study holds %d trials (raise hydra.sweeper.n_trials)", self.n_trials)
        for _, study, _ in studies:
            log_best(study)
        return returns

    def _batch(self, studies: list, space: dict, fixed: list[str], turn: int) -> list:
        """Up to ``n_jobs`` trials, one per study in turn (an interrupted search leaves the cells balanced)."""
        batch, idle = [], 0
        while len(batch) < self.n_jobs and idle < len(studies):
            point, study, stale = studies[(turn + len(batch) + idle) % len(studies)]
            if stale:
                trial = stale.pop(0)
                number, params = trial.number, trial.params
            elif len(study.trials) < self.n_trials:
                study.sampler = make_sampler(self.sampler, self.sampler.seed + 7919 * len(study.trials))
                trial = study.ask(space)
                number, params = trial.number, trial.params
            else:
                idle += 1
                continue
            overrides = [*fixed, *point, *(f"{k}={v}" for k, v in params.items())]
            batch.append((study, number, [*overrides, f"search.study='{study.study_name}'", f"search.trial={number}"]))
        return batch

    def _tell(self, study, number: int, result) -> None:
        from hydra.core.utils import JobStatus
        from optuna.trial import TrialState

        value = result.return_value if result.status == JobStatus.COMPLETED else None
        try:
            if value == PRUNED:
                study.tell(number, state=TrialState.PRUNED)
            elif isinstance(value, float | int) and math.isfinite(value):
                study.tell(number, float(value))
            else:
                study.tell(number, state=TrialState.FAIL)
        except (ValueError, RuntimeError) as err:  # already told (a skipped, finished job): keep what it says
            log.warning("trial %d of %r: %s", number, study.study_name, err)


def check_direction(study, wanted: str) -> None:
    """A study continued from storage keeps the direction it was created with: it must be the one wanted."""
    found = study.direction.name.lower()
    if found != wanted:
        raise SweepError(
            f"study {study.study_name!r} {found}s its objective, but this search should {wanted} it (the direction "
            "cannot change): give the search another hydra.sweeper.study_name"
        )


def log_best(study) -> None:
    """One line per study: its best trial so far."""
    try:
        best = study.best_trial
    except ValueError:
        log.info("study %r: no finished trial yet", study.study_name)
        return
    log.info("study %r: best trial %d, value %.4f, %s", study.study_name, best.number, best.value, best.params)


# --- a sweep on a cluster ------------------------------------------------------------------------------------------

SWEEP_DIR_ENV = "RNNLAB_SWEEP_DIR"  # the sweep's output folder, where the SLURM launcher keeps its jobs' files
CANCEL_WAIT = 90.0  # seconds to wait for cancelled cluster jobs to end (SLURM's KillWait is 30 s by default)


def cluster_jobs(sweep_dir: str | Path) -> list[str]:
    """The SLURM job ids the submitit launcher submitted for this sweep (``.submitit/<job id>[_<task>]/``)."""
    folder = Path(sweep_dir) / ".submitit"
    if not folder.is_dir():
        return []
    return sorted({p.name.split("_")[0] for p in folder.iterdir() if p.is_dir() and p.name[:1].isdigit()})


def cancel_cluster_jobs(sweep_dir: str | None = None) -> None:
    """An interrupted sweep cancels the cluster jobs it submitted, and waits for them to end, so a rerun finds
    their runs KILLED with checkpoints (not still training) and nothing trains on unseen."""
    import os
    import shutil
    import subprocess
    import time

    sweep_dir = sweep_dir or os.environ.get(SWEEP_DIR_ENV)
    jobs = cluster_jobs(sweep_dir) if sweep_dir else []
    if not jobs or not shutil.which("scancel"):
        return
    log.info("cancelling the sweep's SLURM jobs %s", ", ".join(jobs))
    subprocess.run(["scancel", *jobs], check=False)
    deadline = time.monotonic() + CANCEL_WAIT
    while time.monotonic() < deadline:
        listed = subprocess.run(["squeue", "-h", "-j", ",".join(jobs)], capture_output=True, text=True, check=False)
        if listed.returncode != 0 or not listed.stdout.strip():
            return
        time.sleep(1)
    log.warning("SLURM jobs %s are still listed %.0f s after scancel", ", ".join(jobs), CANCEL_WAIT)
