"""The profile and the arithmetic limit: the FLOPs a step runs, counted by hand for PTB-small; a matmul probe that
measures a rate; op names from real traces attributed to the model's parts; a real traced step of a tiny language
model whose parts are all there."""

import pytest
from omegaconf import OmegaConf

from pipeline import data, profile, speed, tasks
from tests.conftest import compose_config

PTB = {"name": "ptb", "kind": "language_model", "input": "tokens", "vocab_size": 10000}
MNIST = {"name": "mnist", "kind": "classification", "input": "steps", "features": 28, "num_classes": 10}


def test_ptb_small_step_runs_the_flops_counted_by_hand():
    cfg = compose_config(["experiment=ptb_small"])
    matmuls = speed.step_matmuls(cfg, PTB, "bfloat16_grad", steps=20)
    # Per token: output layer 3 x 2 x 200 x 10,000 = 12 MFLOP; per LSTM layer 6 matmuls of 2 x 200 x 800 = 1.92 MFLOP.
    per_token = sum(mm.flops for mm in matmuls) / (20 * 20)
    assert per_token == 3 * 2 * 200 * 10_000 + 2 * 6 * 2 * 200 * 800
    dtypes = {(mm.part, mm.dtype) for mm in matmuls if mm.part.startswith("output")}
    assert dtypes == {("output forward", "float32"), ("output backward", "bfloat16")}  # bfloat16 gradients only
    recurrent = [mm for mm in matmuls if mm.count == 20]  # each step's h @ recurrent kernel, and back
    assert {(mm.m, mm.k, mm.n) for mm in recurrent} == {(20, 200, 800), (20, 800, 200)}


def test_classifier_step_has_no_output_layer_matmuls_and_reads_its_features():
    cfg = OmegaConf.create({"model": {"cell": "gru", "units": 8, "layers": 1, "bidirectional": True,
                                      "embedding_dim": None}, "trainer": {"batch_size": 4}})  # fmt: skip
    matmuls = speed.step_matmuls(cfg, MNIST, "float32", steps=28)
    assert {mm.part for mm in matmuls} == {"recurrent forward", "recurrent backward"}
    projection = matmuls[0]
    assert (projection.m, projection.k, projection.n, projection.count) == (4 * 28, 28, 24, 2)  # 3 gates, 2 ways


@pytest.mark.parametrize("shape", [(8, 16, 64, 1), (4, 32, 8, 5)])
def test_matmul_probe_measures_a_rate(shape):
    m, k, n, chain = shape
    rate = speed.matmul_rate(m, k, n, chain=chain, seconds=0.02)
    assert 0.001 < rate < 1e5  # GFLOP/s: something, and not absurd


def test_ops_are_attributed_to_the_model_parts():
    layers = ["tokens", "embedding", "lstm_1", "lstm_2", "logits"]
    prefix = "while/cond/then/_123/while/cond/StatefulPartitionedCall/"
    cases = {
        "lstm_lm_ptb_1/logits_1/add:_MklNativeFusedMatMul": "output layer forward",
        "gradient_tape/lstm_lm_ptb_1/logits_1/add/Sum:Sum": "output layer backward",
        "bfloat16_grad/MatMul_1:_MklMatMul": "output layer backward",
        "compile_loss/sequence_loss/Softmax:_MklSoftmax": "softmax cross-entropy",
        "sparse_xent/TensorScatterSub:TensorScatterSub": "softmax cross-entropy",
        "gradient_tape/lstm_lm_ptb_1/lstm_2_1/MatMul/MatMul:_MklMatMul": "lstm_2 backward",
        "lstm_lm_ptb_1/lstm_1_1/transpose:_MklTranspose": "lstm_1 forward",
        "lstm_lm_ptb_1/embedding_1/GatherV2:GatherV2": "embedding forward",
        "sgd_1/Square_7:Square": "gradient clipping",
        "sgd_10_1/Sum_8:Sum": "gradient clipping",  # the tenth optimizer built in this process
        "folded_clip_sgd_1/L2Loss_8:L2Loss": "gradient clipping",
        "folded_clip_sgd_1/AssignSubVariableOp:AssignSubVariableOp": "optimizer update",
        "sgd_1/AssignSubVariableOp:AssignSubVariableOp": "optimizer update",
        "Identity:Identity": "other",
        "lstm_lm_ptb_3/lstm_1_12/add:_MklNativeFusedMatMul": "lstm_1 forward",
    }
    for op, part in cases.items():
        assert profile.category(prefix + op, layers) == part, op


def test_xla_executables_are_told_apart_by_the_hlo_ops_traced_inside():
    assert profile.xla_part(["MemoryAllocation", "broadcast_multiply_fusion", "BlockUntilReady"]) == (
        "softmax cross-entropy"  # kernels._xent_grad: one fusion
    )
    assert profile.xla_part(["ThunkExecutor::Execute", "MatMul_20.2", "bitcast_add_fusion.19"]) == (
        "recurrent loops (XLA)"
    )
    assert profile.xla_part([]) == "recurrent loops (XLA)"  # traced without XLA_TRACEME: nothing inside
    # The forward while loop in the AVX2 class: no matmul traced, still not the loss gradient.
    forward = ["MemoryAllocation", "copy.3", "end: copy.3", "wrapped_broadcast", "bitcast_pad_fusion.1", "while.2"]
    assert profile.xla_part(forward) == "recurrent loops (XLA)"
    assert profile.xla_part(["broadcast_multiply_fusion", "end: broadcast_multiply_fusion"]) == "softmax cross-entropy"


@pytest.mark.integration  # the profiler's trace: ~6 s
def test_a_traced_step_of_a_tiny_language_model_has_every_part(tiny_ptb):
    cfg = tiny_ptb("trainer.precision=bfloat16_grad")
    task = tasks.make(cfg, data.load(cfg.paths.data, "ptb"))
    measured = profile.profile_task(task, steps=4)
    parts = measured["ms_per_step"]
    for part in ("output layer forward", "output layer backward", "softmax cross-entropy", "recurrent loops (XLA)",
                 "optimizer update", "gradient clipping", "embedding forward"):  # fmt: skip
        assert parts.get(part, 0) > 0, part
    assert measured["wall_ms_per_step"] > 0
    bound = speed.task_limit(task)
    frame = profile.table(measured, bound)
    row = frame.set_index("part").loc["output layer forward"]
    assert row["gflop"] == pytest.approx(2 * 4 * 5 * 32 * 20 / 1e9, abs=1e-3)  # 20 tokens, 32 units, 20 words
    assert bound["per_sec"] > 0 and frame["share_pct"].iloc[:-1].sum() == pytest.approx(100, abs=0.5)
