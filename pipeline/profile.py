"""Where a training step's time goes, and how fast this machine could go at all.

    python -m pipeline.profile                       # or: make profile (needs the prepared data: make run)
    python -m pipeline.profile profile.case=ptb_small_lstm_float32 profile.steps=50

Two measurements, for one of the bench's cases (``pipeline.bench.CASES``):

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import tensorflow as tf
from omegaconf import DictConfig

from pipeline import cells, config, data, tasks

log = logging.getLogger(__name__)

config.register()


@dataclass(frozen=True)
class Matmul:
    """``count`` matmuls of (m, k) @ (k, n) in ``dtype`` per training step, in one part of the model."""

    part: str
    m: int
    k: int
    n: int
    count: int
    dtype: str = "float32"

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.count


def step_matmuls(cfg: DictConfig, meta: dict[str, Any], precision: str, steps: int) -> list[Matmul]:
    """The matmuls of one training step of batch ``cfg.trainer.batch_size`` over ``steps`` time steps: per recurrent
    layer and direction the input projections (one matmul over all steps, as the fused kernels run them), the
    recurrent matmul each step, and their backward matmuls; for a language model the output layer's three."""
    m, batch = cfg.model, cfg.trainer.batch_size
    rows, units, width = batch * steps, m.units, cells.get(m.cell).gates * m.units
    directions = 2 if m.bidirectional else 1
    features = (m.embedding_dim or units) if meta["input"] == "tokens" or meta["kind"] == "language_model" else 0
    features = features or meta.get("features", units)
    out: list[Matmul] = []
    for layer in range(m.layers):
        inputs = features if layer == 0 else units * directions
        out += [
            Matmul("recurrent forward", rows, inputs, width, directions),  # input projections
            Matmul("recurrent forward", batch, units, width, steps * directions),  # h @ recurrent kernel
            Matmul("recurrent backward", rows, width, inputs, directions),  # into the inputs
            Matmul("recurrent backward", inputs, rows, width, directions),  # into the kernel
            Matmul("recurrent backward", batch, width, units, steps * directions),  # into the previous state
            Matmul("recurrent backward", units, rows, width, directions),  # into the recurrent kernel
        ]
    if meta["kind"] == "language_model":
        vocab = meta["vocab_size"]
        low = "bfloat16" if precision in ("bfloat16_grad", "bfloat16_output") else "float32"
        high = "bfloat16" if precision == "bfloat16_output" else "float32"
        out += [
            Matmul("output forward", rows, units, vocab, 1, high),
            Matmul("output backward", rows, vocab, units, 1, low),
            Matmul("output backward", units, rows, vocab, 1, low),
        ]
    return out


def matmul_rate(m: int, k: int, n: int, dtype: str = "float32", chain: int = 1, seconds: float = 0.3) -> float:
    """GFLOP/s of (m, k) @ (k, n) matmuls in ``dtype`` on this machine, best of 3 rounds of about ``seconds``.

    ``chain`` 1: one matmul per call, cycling through 4 distinct input pairs so that no repetition finds the last
    one's operands in cache (a chained probe of the large output-layer shapes read above this CPU's peak).
    ``chain`` > 1: that many dependent matmuls in one compiled call, each reading the last one's result, as a
    recurrent layer runs its per-step matmul (a call per small matmul would time the call, not the arithmetic).
    """
    rng = tf.random.Generator.from_seed(0)
    pairs = [(tf.cast(rng.normal((m, k)), dtype), tf.cast(rng.normal((k, n)) / k, dtype)) for _ in range(4)]

    @tf.function
    def product(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
        for _ in range(chain - 1):
            a = tf.matmul(a, b)[:, :k] if n >= k else tf.tile(tf.matmul(a, b), [1, -(-k // n)])[:, :k]
        return tf.matmul(a, b)

    for a, b in pairs:
        product(a, b).numpy()
    started = time.perf_counter()
    product(*pairs[0]).numpy()
    reps = max(4, int(seconds / max(time.perf_counter() - started, 1e-6)))
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        for i in range(reps):
            result = product(*pairs[i % 4])
        result.numpy()
        best = max(best, 2 * m * k * n * chain * reps / (time.perf_counter() - started) / 1e9)
    return best


def limit(matmuls: list[Matmul], units_per_step: int) -> dict[str, Any]:
    """The arithmetic limit: each distinct matmul's measured rate (per-step matmuls timed as a chain of
    ``count``), and the units (tokens, samples) per second if a step took only its matmuls' time at those rates."""
    rates: dict[tuple, float] = {}
    for mm in matmuls:
        shape = (mm.m, mm.k, mm.n, mm.dtype, mm.count)
        if shape not in rates:
            rates[shape] = matmul_rate(*shape)
    seconds = [(mm, mm.flops / (rates[(mm.m, mm.k, mm.n, mm.dtype, mm.count)] * 1e9)) for mm in matmuls]
    parts: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"gflop": 0.0, "ms_at_limit": 0.0})
    for mm, s in seconds:
        parts[mm.part]["gflop"] += mm.flops / 1e9
        parts[mm.part]["ms_at_limit"] += 1000 * s
    shapes = [
        {"m": m, "k": k, "n": n, "dtype": dtype, "per_call": count, "gflop_per_sec": round(rate, 1)}
        for (m, k, n, dtype, count), rate in rates.items()
    ]
    return {
        "units_per_step": units_per_step,
        "per_sec": units_per_step / sum(s for _, s in seconds),
        "gflop_per_step": sum(mm.flops for mm in matmuls) / 1e9,
        "parts": dict(parts),
        "rates": shapes,
    }


def task_limit(task: tasks.Task) -> dict[str, Any]:
    """``limit`` for a task's model, batch and window (or sequence) length."""
    x, _ = task.train_arrays(0)
    steps = x.shape[1]
    matmuls = step_matmuls(task.cfg, task.dataset.meta, task.precision, steps)
    per_step = task.batch_size * (steps if task.unit == "tokens" else 1)
    return limit(matmuls, per_step)


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
    """The part an XLA executable belongs to, from the names of the HLO ops traced inside it."""
    ops = list(hlo_ops)
    if ops and not any("MatMul" in op or op.startswith("dot") for op in ops):
        return "softmax cross-entropy"  # the only XLA code without a matmul: the loss gradient
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
    from pipeline import bench  # the cases and machine description are the bench's

    config.validate(cfg, "profile")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_TRACEME}".strip()  # before XLA compiles
    if cfg.profile.case not in bench.CASES:
        raise ValueError(f"profile.case: unknown case {cfg.profile.case!r}; choose from {', '.join(bench.CASES)}")
    with tempfile.TemporaryDirectory() as tmp:
        case = bench.case_config(cfg, bench.CASES[cfg.profile.case], cfg.profile.steps, Path(tmp))
        bench.setup_runtime(case)
        task = tasks.make(case, data.load(case.paths.data, case.data.name))
        measured = profile_task(task, cfg.profile.steps)
    bound = task_limit(task)
    frame = table(measured, bound)
    per_step = bound["units_per_step"]
    results = {
        "case": cfg.profile.case,
        "cpu": bench.cpu_model(),
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
