"""Where a training step's time goes, and how fast this machine could go at all.

    python -m pipeline.profile                       # or: make profile (needs the prepared data: make run)
    python -m pipeline.profile profile.case=ptb_small_lstm_float32 profile.steps=50

Two measurements, for one of the bench's cases (``pipeline.speed.CASES``):

- **The arithmetic limit.** Every matmul a training step runs (``step_matmuls``: shapes from the model config, the
  dtypes from the precision), timed alone at its own shape and dtype with fresh inputs each repetition
  (``matmul_rate``); the limit is the step's time if every matmul ran at that rate and nothing else took any time.
- **The profile.** ``profile.steps`` steps of the pipeline's training path traced by TensorFlow's profiler; each
  op's time summed into the model's parts (``category``). Ops on TensorFlow's two inter-op threads overlap, so the
  shares are of summed op time; the wall-clock time per step is given beside them.

Results: ``reports/profile.json`` and ``reports/profile.md``. The bench reports each case's throughput as a fraction
of its limit (``limit``).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import tensorflow as tf
from omegaconf import DictConfig

from pipeline import config, data, speed, tasks

log = logging.getLogger(__name__)

config.register()


# --- the profile ---------------------------------------------------------------------------------------------------
BOOKKEEPING = ("end: ", "ExecutorState::", "ThreadpoolListener", "ParallelFor", "Memory", "ThunkExecutor", "BlockUntil")
CLIPPING_OPS = ("Square", "Sum", "L2Loss", "Sqrt", "Maximum", "Minimum", "RealDiv", "Reciprocal", "AddN")


def category(op: str, layers: list[str]) -> str:
    """The part of the model a TensorFlow op (``scope/name:Type``) belongs to, from its name scopes: a layer of the
    model (forward, or ``gradient_tape/`` for backward), the loss, the optimizer (its global-norm arithmetic
    counted as clipping), or the output layer's bfloat16 gradient (``bfloat16_grad`` scope)."""
    name, _, kind = op.rpartition(":")
    path = re.sub(r".*StatefulPartitionedCall/", "", name)
    backward = "gradient_tape/" in path or "_grad/" in path
    if "sequence_loss" in path or "sparse_xent" in path:
        return "softmax cross-entropy"
    if "bfloat16_grad" in path:
        return "output layer backward"
    for layer in layers:
        if re.search(rf"(^|/){re.escape(layer)}(_\d+)*/", path):
            part = "output layer" if layer == "logits" else ("embedding" if layer == "embedding" else layer)
            return f"{part} {'backward' if backward else 'forward'}"
    if re.match(r"(sgd|folded_clip_sgd|adam|rmsprop)(_\d+)*/", path, re.IGNORECASE):
        return "gradient clipping" if kind in CLIPPING_OPS else "optimizer update"
    return "other"


def op_times(trace: Path, layers: list[str]) -> dict[str, float]:
    """Seconds per category summed over a trace folder's host ops; XLA-compiled code counted from its executables'
    events: the recurrent loops, or the loss gradient (``kernels._xent_grad``), told apart by whether the HLO ops
    traced inside run a matmul (``XLA_TRACEME``; without it all XLA time counts as the loops)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # TensorFlow's own copy of the trace format

    space = xplane_pb2.XSpace()
    space.ParseFromString(next(trace.rglob("*.xplane.pb")).read_bytes())
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    names = {k: v.name for k, v in plane.event_metadata.items()}
    totals: collections.Counter[str] = collections.Counter()
    for line in plane.lines:
        if not line.name.startswith("tf_Compute"):
            continue
        events = sorted(line.events, key=lambda e: e.offset_ps)
        for at, event in enumerate(events):
            name = names[event.metadata_id]
            if name.startswith("CpuExecutable::ExecuteAsyncOnStream"):
                totals[xla_part(names[e.metadata_id] for e in inside(events, at))] += event.duration_ps / 1e12
            elif ":" in name and not name.startswith(BOOKKEEPING):
                totals[category(name, layers)] += event.duration_ps / 1e12
    return dict(totals)


XLA_TRACEME = "--xla_cpu_enable_xprof_traceme=true"  # XLA_FLAGS: XLA's CPU code traces each HLO op it runs


def inside(events: list, at: int):
    """The events that start after ``events[at]`` (sorted by start) and end within it."""
    end = events[at].offset_ps + events[at].duration_ps
    for event in events[at + 1 :]:
        if event.offset_ps >= end:
            return
        if event.offset_ps + event.duration_ps <= end:
            yield event


def xla_part(hlo_ops) -> str:
    """The part an XLA executable belongs to, from the names of the HLO ops traced inside it: the loss gradient is
    one fused pass over the logits; the loops run many ops, and their matmuls are not always traced (a while loop's
    body, or dots XLA emits itself, as in the AVX2 class), so a missing matmul does not tell them apart."""
    ops = {op for op in hlo_ops if not op.startswith(BOOKKEEPING)}
    if len(ops) == 1 and next(iter(ops)).split(".")[0].endswith("fusion"):
        return "softmax cross-entropy"
    return "recurrent loops (XLA)"


def profile_task(task: tasks.Task, steps: int) -> dict[str, Any]:
    """Trace ``steps`` training steps (after a warm-up of as many): per-category op time and the wall time."""
    x, y = task.train_arrays(0)
    x, y = x[: steps * task.batch_size], y[: steps * task.batch_size]
    task.run_batches(True, x, y)  # tracing, compiling, XLA
    with tempfile.TemporaryDirectory() as tmp:
        tf.profiler.experimental.start(tmp)
        started = time.perf_counter()
        task.run_batches(True, x, y)
        wall = time.perf_counter() - started
        tf.profiler.experimental.stop()
        seconds = op_times(Path(tmp), [layer.name for layer in task.model.layers])
    return {"wall_ms_per_step": 1000 * wall / steps, "ms_per_step": {k: 1000 * v / steps for k, v in seconds.items()}}


NOT_RECURRENT = ("output", "softmax", "embedding", "gradient", "optimizer", "other")
LIMIT_PARTS = {  # profile row -> the step_matmuls parts it runs
    "output layer forward": ("output forward",),
    "output layer backward": ("output backward",),
    "recurrent layers, all": ("recurrent forward", "recurrent backward"),
}


def table(profile: dict[str, Any], bound: dict[str, Any]) -> pd.DataFrame:
    """One row per part: measured ms per step and share of summed op time, its matmul FLOPs and their time at the
    limit, and the limit's share of the measured time (how close the part runs to the arithmetic limit). The
    recurrent layers' rows (per layer, and the XLA loops) are also summed into one row."""
    measured = dict(sorted(profile["ms_per_step"].items(), key=lambda kv: -kv[1]))
    recurrent = sum(ms for part, ms in measured.items() if not part.startswith(NOT_RECURRENT))
    measured["recurrent layers, all"] = recurrent
    total = sum(profile["ms_per_step"].values())
    rows = []
    for part, ms in measured.items():
        limits = [bound["parts"].get(name, {}) for name in LIMIT_PARTS.get(part, ())]
        at_limit = sum(p.get("ms_at_limit", 0.0) for p in limits)
        rows.append(
            {
                "part": part,
                "ms_per_step": round(ms, 2),
                "share_pct": round(100 * ms / total, 1),
                "gflop": round(sum(p.get("gflop", 0.0) for p in limits), 3),
                "ms_at_limit": round(at_limit, 2),
                "limit_share_pct": round(100 * at_limit / ms, 1) if ms else None,
            }
        )
    return pd.DataFrame(rows)


def run(cfg: DictConfig) -> dict[str, Any]:

    config.validate(cfg, "profile")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_TRACEME}".strip()  # before XLA compiles
    if cfg.profile.case not in speed.CASES:
        raise ValueError(f"profile.case: unknown case {cfg.profile.case!r}; choose from {', '.join(speed.CASES)}")
    with tempfile.TemporaryDirectory() as tmp:
        case = speed.case_config(cfg, speed.CASES[cfg.profile.case], cfg.profile.steps, Path(tmp))
        tasks.setup_runtime(case)
        task = tasks.make(case, data.load(case.paths.data, case.data.name))
        measured = profile_task(task, cfg.profile.steps)
    bound = speed.task_limit(task)
    frame = table(measured, bound)
    per_step = bound["units_per_step"]
    results = {
        "case": cfg.profile.case,
        "cpu": speed.cpu_model(),
        "precision": task.precision,
        "kernels": task.kernels,
        "wall_ms_per_step": round(measured["wall_ms_per_step"], 2),
        f"{task.unit}_per_sec": round(1000 * per_step / measured["wall_ms_per_step"]),
        f"limit_{task.unit}_per_sec": round(bound["per_sec"]),
        "gflop_per_step": round(bound["gflop_per_step"], 3),
        "parts": frame.to_dict("records"),
        "matmul_rates": bound["rates"],
    }
    out = Path(cfg.paths.reports)
    data.write_json(out / "profile.json", results)
    lines = [
        f"# Profile: {cfg.profile.case}",
        "",
        f"{results['cpu']}; precision {task.precision}, kernels {task.kernels}; {cfg.profile.steps} steps traced.",
        f"Wall clock {results['wall_ms_per_step']} ms per step ({results[f'{task.unit}_per_sec']:,} {task.unit}/s);"
        f" arithmetic limit {results[f'limit_{task.unit}_per_sec']:,} {task.unit}/s"
        f" ({results['gflop_per_step']} GFLOP per step at the measured matmul rates).",
        "",
        frame.to_markdown(index=False),
        "",
        pd.DataFrame(bound["rates"]).to_markdown(index=False),
        "",
    ]
    (out / "profile.md").write_text("\n".join(lines))
    return results


@hydra.main(config_path="../conf", config_name="profile", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)
    print((Path(cfg.paths.reports) / "profile.md").read_text())


if __name__ == "__main__":
    main()
