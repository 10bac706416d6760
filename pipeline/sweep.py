"""Sweeps: the command-line forms that expand into Hydra multiruns.

``seeds=N`` repeats every configuration of a sweep (named, or a hand-written grid) with seeds 1..N: the same seeds
for every configuration, so runs pair up by seed (same initial weights draw, same data order) and
``pipeline.compare`` can test differences over seeds.
"""

from __future__ import annotations

import _thread
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from pipeline.objective import for_kind, of_metrics
from pipeline.redaction import redact, redact_file

log = logging.getLogger(__name__)

MAX_SEEDS = 1000
_SEEDS = re.compile(r"\+?seeds=(?P<value>.*)")


class SweepError(ValueError):
    """A sweep option that cannot work; the message says how to write it."""


SHOW_FLAGS = {"--cfg", "-c", "--info", "-i"}  # Hydra's flags that print a config instead of running it


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
    if any(a in SHOW_FLAGS or a.startswith(("--cfg=", "--info=")) for a in argv):  # one config: the first job's
        log.warning("seeds=%s: showing the first job's config (seed=1)", value)
        return [*argv[:index], "seed=1", *argv[index + 1 :]]
    seeds = ["seed=" + ",".join(str(s) for s in range(1, int(value) + 1))]
    if not {"-m", "--multirun"} & set(argv) and not any(a.startswith("hydra.mode=") for a in argv):
        seeds.append("hydra.mode=MULTIRUN")  # beside the seeds: an override after a flag's value would be refused
    return [*argv[:index], *seeds, *argv[index + 1 :]]


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


def sweep_overrides(hydra_cfg: DictConfig) -> dict[str, str]:
    """The sweep's named sweep parameters and command-line overrides, as ``{key: "a,b,c"}`` (redacted); the command
    line wins, as it does when Hydra's sweeper makes the jobs (``sweep=cells_toy seeds=5`` runs 5 seeds)."""
    params = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()]
    return {key: redact(line.partition("=")[2]) for key, line in by_key([*params, *hydra_cfg.overrides.task]).items()}


def by_key(lines: list[str]) -> dict[str, str]:
    """Override lines by their key (``+``/``~`` aside), the last line of a key winning: the command line, given
    after a sweep's own parameters, over them."""
    return {str(line).split("=", 1)[0].lstrip("+~"): str(line) for line in lines}


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


def best_objective(history: list[dict[str, float]]) -> float:
    """A trial's result: its best epoch's validation metric (the model early stopping would keep)."""
    return of_metrics(history[0] if history else {}).best_epoch(history)


def study_storage(search: DictConfig, tracking_uri: str) -> str:
    """Where studies persist. ``auto``: an Optuna journal file beside a sqlite MLflow store
    (``mlflow.db`` -> ``mlflow-optuna.journal``); with a tracking server, the team server's PostgreSQL."""
    if search.storage != "auto":
        return str(search.storage)
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return f"journal:{db.with_name(db.stem + '-optuna.journal')}"
    from pipeline.teamserver import DEFAULT_DIR, ServerError, TeamServer

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
        self.number, self.epochs = int(search.trial), epochs

    def report(self, epoch: int, metrics: dict[str, float]) -> None:
        """Report the epoch; raise ``Pruned`` when the pruner says stop (never after the last epoch: a trial trained
        to the end is a result, its test metric to come)."""
        objective = of_metrics(metrics)
        check_direction(self.study, objective.direction)
        value = metrics.get(objective.val, float("nan"))
        if not math.isfinite(value):
            return  # a diverged epoch is the run's failure to report, not the pruner's decision
        self.trial.report(value, epoch)
        if epoch + 1 < self.epochs and self.trial.should_prune():
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
    value gets the same number of trials) and fixed overrides. A key given twice takes its last value: the command
    line's over the preset's parameters (``sweep=tune_cells_toy model=gru`` searches the GRU alone)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space, grid, fixed = {}, [], []
    for override in OverridesParser.create().parse_overrides(list(by_key(lines).values())):
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
        from pipeline.data.registry import kind_of

        objective = for_kind(kind_of(self.config.data.source))
        wanted = objective.direction
        if self.direction not in ("auto", wanted):
            raise SweepError(
                f"hydra.sweeper.direction={self.direction}, but the trials report {objective.val}: use {wanted}"
            )
        return wanted

    def base_name(self) -> str:
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
        redact_file(sweep_dir / "multirun.yaml")  # before any job starts: a search with none to run masks it too
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


# --- a SLURM request no node can meet ------------------------------------------------------------------------------
# SLURM queues such a job forever (pending, reason PartitionConfig) and submitit waits on it forever: refuse it first.

SLURM_LAUNCHER = "SlurmLauncher"  # hydra-submitit-launcher's class for hydra/launcher=slurm
SCONTROL_TIMEOUT = 30.0  # seconds; a controller that does not answer means no check, not a stuck sweep
UNLIMITED = ("UNLIMITED", "INFINITE")
_GPUS = re.compile(r"\bgpu(?::[^:,(\s]+)?:(\d+)")  # Gres=gpu:4, gpu:a100:4(S:0-1), gpu:v100:2,mps:100


@dataclass(frozen=True)
class Partition:
    """What a SLURM partition offers one job: its biggest node's CPUs, memory and GPUs, its node and time limits."""

    name: str
    cpus: int | None  # None: no node of it is known (nothing to compare)
    mem_mb: int | None
    gpus: int | None
    nodes: int | None  # the most nodes one job may have (MaxNodes, TotalNodes)
    max_time: str  # MaxTime as scontrol prints it: UNLIMITED, 02:00:00, 1-00:00:00


def scontrol_records(text: str) -> list[dict[str, str]]:
    """``scontrol show partition|node -o``: one record per line of ``Key=Value`` fields. Free-text values (OS=,
    Reason=) hold spaces; their later words are dropped, and nothing here reads them."""
    records = []
    for line in text.splitlines():
        fields: dict[str, str] = {}
        for word in line.split():
            key, sep, value = word.partition("=")
            if sep:
                fields.setdefault(key, value)
        if fields:
            records.append(fields)
    return records


def slurm_minutes(text: str) -> float:
    """A SLURM time limit (``UNLIMITED``, ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) in minutes."""
    if text.upper() in UNLIMITED:
        return math.inf
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    return int(days or 0) * 1440 + hours * 60 + minutes + seconds / 60


def _count(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def find_partition(partitions: list[dict[str, str]], nodes: list[dict[str, str]], name: str | None) -> Partition:
    """The partition a job goes to (``None``: the cluster's default, ``Default=YES``), from scontrol's records."""
    names = ", ".join(p["PartitionName"] for p in partitions if p.get("Hidden") != "YES")
    if name is None:
        found = [p for p in partitions if p.get("Default") == "YES"]
        if not found:
            raise SweepError(
                f"hydra.launcher.partition=null: this cluster has no default partition; set one of: {names}"
            )
    else:
        found = [p for p in partitions if p.get("PartitionName") == name]
        if not found:
            raise SweepError(
                f"hydra.launcher.partition={name!r}: no such partition on this cluster; set one of: {names}"
            )
    part = found[0]
    members = [n for n in nodes if part["PartitionName"] in n.get("Partitions", "").split(",")]
    # CPUEfctv (SLURM 22.05+): the CPUs jobs may use, less those reserved for the system (CpuSpecList).
    cpus = [_count(n.get("CPUEfctv") or n.get("CPUTot")) or 0 for n in members]
    limits = [c for c in (_count(part.get("MaxNodes")), _count(part.get("TotalNodes"))) if c is not None]
    return Partition(
        name=part["PartitionName"],
        cpus=max(cpus) if members else None,
        mem_mb=max(_count(n.get("RealMemory")) or 0 for n in members) if members else None,
        gpus=max(sum(map(int, _GPUS.findall(n.get("Gres", "")))) for n in members) if members else None,
        nodes=min(limits) if limits else None,
        max_time=part.get("MaxTime", "UNLIMITED"),
    )


def request_problems(launcher: Mapping[str, Any], part: Partition) -> list[str]:
    """What a job of ``hydra.launcher`` asks that ``part`` can never give, each with the value that fits."""
    tasks = launcher.get("tasks_per_node") or 1
    where = f"any node of partition {part.name!r} has"
    checks = [  # (setting, value asked, most that fits, what is too much)
        ("tasks_per_node", tasks, part.cpus, f"asks for more CPUs than {where} ({part.cpus})"),
        (
            "cpus_per_task",
            launcher.get("cpus_per_task"),
            None if part.cpus is None else part.cpus // tasks,
            f"asks for more CPUs than {where} ({part.cpus})" + (f" for {tasks} tasks" if tasks > 1 else ""),
        ),
        (
            "mem_gb",
            launcher.get("mem_gb"),
            None if part.mem_mb is None else part.mem_mb // 1024,
            f"asks for more memory than {where} ({part.mem_mb} MB)",
        ),
        ("gpus_per_node", launcher.get("gpus_per_node"), part.gpus, f"asks for more GPUs than {where} ({part.gpus})"),
        (
            "nodes",
            launcher.get("nodes"),
            part.nodes,
            f"asks for more nodes than partition {part.name!r} allows ({part.nodes})",
        ),
        (
            "timeout_min",
            launcher.get("timeout_min"),
            slurm_minutes(part.max_time),
            f"is longer than partition {part.name!r} allows (MaxTime={part.max_time})",
        ),
    ]
    problems = []
    for key, asked, fits, why in checks:
        if asked is not None and fits is not None and asked > fits:
            more = " (or less)" if fits else ""
            problems.append(f"hydra.launcher.{key}={asked} {why}: set hydra.launcher.{key}={int(fits)}{more}")
    return problems


def _scontrol(*args: str) -> str:
    done = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT, check=True)
    return done.stdout


def check_slurm_request(launcher: Mapping[str, Any]) -> None:
    """Before a SLURM sweep submits anything: raise ``SweepError`` (one line, the setting and the value that fits)
    when its jobs ask what the partition can never give. Without a working ``scontrol``: a warning, no check."""
    if not str(launcher.get("_target_", "")).endswith(SLURM_LAUNCHER):
        return
    name = launcher.get("partition")
    if name is not None and "," in str(name):
        return  # several partitions: SLURM takes the first that can run the job; not compared here
    try:  # --all: hidden partitions too (a job may name one)
        partitions = scontrol_records(_scontrol("--all", "show", "partition", "-o"))
        nodes = scontrol_records(_scontrol("--all", "show", "node", "-o"))
    except (OSError, subprocess.SubprocessError) as err:
        failed = isinstance(err, subprocess.CalledProcessError) and err.stderr.strip()
        why = (failed or str(err)).splitlines()[-1]
        log.warning("could not check the SLURM jobs' request against the cluster (scontrol: %s); going on", why)
        return
    problems = request_problems(launcher, find_partition(partitions, nodes, None if name is None else str(name)))
    if problems:
        raise SweepError("; ".join(problems))


# --- SLURM jobs that can never start -------------------------------------------------------------------------------
# A limit the check above does not see (a QOS, an account, additional_parameters) leaves the jobs pending with a
# reason no amount of waiting resolves: a daemon thread watches the sweep's jobs and stops the sweep on one.

WATCH_INTERVAL = 5.0  # seconds between two looks at the sweep's jobs in squeue
NEVER_STARTS = {  # squeue's pending reason -> the setting to change
    "PartitionConfig": "the job asks for more CPUs, memory or GPUs than any node of its partition has; lower "
    "hydra.launcher.cpus_per_task, tasks_per_node, mem_gb or gpus_per_node (or hydra.launcher.additional_parameters), "
    "or choose another hydra.launcher.partition",
    "PartitionTimeLimit": "hydra.launcher.timeout_min is above the partition's MaxTime; lower it",
    "PartitionNodeLimit": "hydra.launcher.nodes is outside the partition's node limits; change it",
    "BadConstraints": "no node of the partition has the features hydra.launcher.constraint asks; change it",
    "InvalidAccount": "hydra.launcher.account is not an account this user may charge; change it",
    "InvalidQOS": "hydra.launcher.qos is not a QOS this user may use; change it",
    "DependencyNeverSatisfied": "a job it depends on can no longer succeed; drop the dependency",
}
PER_JOB_FIX = (
    "the job is outside a per-job limit of its QOS or account; ask less of hydra.launcher, or set hydra.launcher.qos"
)
_PER_JOB_LIMIT = re.compile(r"(QOS|Assoc)(Max\w*PerJob\w*|Min\w+)")  # QOSMaxCpuPerJobLimit, QOSMinGRES, ...


def never_starts(reason: str) -> str | None:
    """What to change for a pending reason that waiting never resolves; None for one that may (Resources, ...)."""
    if reason in NEVER_STARTS:
        return NEVER_STARTS[reason]
    if _PER_JOB_LIMIT.fullmatch(reason):
        return PER_JOB_FIX
    return None


def stuck_job(squeue: str) -> str | None:
    """From ``squeue -h -o '%i %t %r'`` lines: one line on the first job pending for a reason that never resolves."""
    for line in squeue.splitlines():
        job, state, reason = (line.split(maxsplit=2) + ["", ""])[:3]
        fix = never_starts(reason.strip()) if state == "PD" else None
        if fix:
            return f"SLURM job {job.split('_')[0]} can never start (pending, reason {reason.strip()}): {fix}"
    return None


class SlurmWatch(threading.Thread):
    """Looks at a sweep's SLURM jobs every few seconds; on one that can never start, cancels the sweep's jobs and
    stops the main thread (waiting on submitit) as SIGTERM would: ``train.cli`` then ends the sweep FAILED."""

    def __init__(self, sweep_dir: str | Path, interval: float = WATCH_INTERVAL) -> None:
        super().__init__(name="slurm-watch", daemon=True)
        self.sweep_dir, self.interval = Path(sweep_dir), interval
        self.stuck: str | None = None

    def look(self) -> str | None:
        """One look: the line saying why a job of the sweep can never start, or None."""
        jobs = cluster_jobs(self.sweep_dir)
        if not jobs:
            return None
        cmd = ["squeue", "-h", "-j", ",".join(jobs), "-o", "%i %t %r"]
        try:
            listed = subprocess.run(cmd, capture_output=True, text=True, timeout=SCONTROL_TIMEOUT, check=False)
        except (OSError, subprocess.SubprocessError):
            return None  # the controller is busy or restarting: look again later
        return stuck_job(listed.stdout) if listed.returncode == 0 else None

    def run(self) -> None:
        while not self.stuck:
            time.sleep(self.interval)
            self.stuck = self.look()
        cancel_cluster_jobs(str(self.sweep_dir))
        handled = callable(signal.getsignal(signal.SIGTERM))  # train.cli's handler; else stop it as Ctrl-C would
        _thread.interrupt_main(signal.SIGTERM if handled else signal.SIGINT)


_watch: SlurmWatch | None = None


def watch_slurm_jobs(config: DictConfig) -> None:
    """Start watching this sweep's jobs when they go to SLURM (``hydra/launcher=slurm``) and squeue is there."""
    global _watch
    if str(config.hydra.launcher.get("_target_", "")).endswith(SLURM_LAUNCHER) and shutil.which("squeue"):
        _watch = SlurmWatch(config.hydra.sweep.dir)
        _watch.start()


def stuck_reason() -> str | None:
    """Why the watch stopped this sweep (its one line), or None when it did not."""
    return _watch.stuck if _watch else None
