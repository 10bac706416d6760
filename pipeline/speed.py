"""What the speed stages (``pipeline.bench``, ``pipeline.profile``) share: their cases (a preset and overrides),
the machine's description, and a model's arithmetic limit on this machine.

The limit: every matmul a training step runs (``step_matmuls``: shapes from the model config, the dtypes from the
precision), timed alone at its own shape and dtype with fresh inputs each repetition (``matmul_rate``); it is the
step's time if every matmul ran at that rate and nothing else took any time.
"""

from __future__ import annotations

import collections
import functools
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow as tf
from hydra import compose
from omegaconf import DictConfig

from pipeline import cells, models, tasks

CASES = {  # case name -> the preset, and overrides; bench.cases picks which run
    "toy_lstm": ("toy_dynamic",),
    "ptb_small_lstm": ("ptb_small",),  # as the preset trains: precision auto
    "ptb_small_lstm_float32": ("ptb_small", "trainer.precision=float32"),
    "ptb_small_lstm_keras_kernels": ("ptb_small", "trainer.kernels=keras"),  # Keras' loops and loss: the lever's gain
    "ptb_small_lstm_layerwise": ("ptb_small", "trainer.wavefront=false"),  # the fused layers one after another
    "ptb_small_lstm_bf16_output": ("ptb_small", "trainer.precision=bfloat16_output"),  # the whole output layer
    "imdb_lstm": ("imdb_lstm",),
    "mnist_lstm": ("mnist_lstm",),
}


def case_overrides(cfg: DictConfig, case: tuple[str, ...], steps: int, store: Path) -> list[str]:
    """The command-line overrides of a case: the preset, its own overrides, an "epoch" of ``steps`` steps, no
    checkpoints and tracking into a throw-away store. One list for the in-process bench and the whole-run commands,
    so that the two time the same thing."""
    preset, *overrides = case
    return [
        f"experiment={preset}",
        *overrides,
        f"paths.root={cfg.paths.root}",
        f"paths.data={cfg.paths.data}",
        f"trainer.max_steps_per_epoch={steps}",
        "trainer.max_eval_batches=1",
        "trainer.verbose=0",
        "trainer.checkpoint=false",
        f"tracking.uri=sqlite:///{store}/mlflow.db",
        f"tracking.artifact_location={store}/artifacts",
        "tracking.experiment=rnnlab-bench",
    ]


def case_config(cfg: DictConfig, case: tuple[str, ...], steps: int, store: Path) -> DictConfig:
    """The preset's config, composed as `experiment=<preset>` would be, with ``case_overrides``."""
    return compose(config_name="config", overrides=case_overrides(cfg, case, steps, store))


def cpu_flags() -> str:
    """The CPU's vector and matrix instruction sets that decide matmul speed (AVX2, AVX-512, bfloat16, AMX)."""
    flags = models.cpu_flag_set() or frozenset()
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_vp2intersect", "amx_bf16", "amx_tile")
    return " ".join(flag for flag in wanted if flag in flags)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return platform.processor() or "unknown"


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


@functools.cache
def machine_rate(size: int = 1024) -> float:
    """GFLOP/s of one large square float32 matmul: the machine's matmul rate, measured once per process (a limit
    at it says how far a model's own shapes, small ones above all, keep it from the machine's best)."""
    return matmul_rate(size, size, size, "float32")


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
