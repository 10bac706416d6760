"""The model and optimizer factories: classifiers and language models, precisions, optimizers, schedules."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from pipeline import models
from tests.conftest import CLASSIFIER_META as META
from tests.conftest import LM_META, lm_cfg, model_cfg, padded


@pytest.mark.parametrize(
    "cfg",
    [
        model_cfg(cell="rnn"),
        model_cfg(cell="lstm"),
        model_cfg(cell="gru"),
        model_cfg(cell="lstm", bidirectional=True),
        model_cfg(cell="gru", bidirectional=True, layers=2, dropout=0.3),
    ],
    ids=["rnn", "lstm", "gru", "bilstm", "bigru-2layer-dropout"],
)
def test_padding_changes_nothing(cfg):
    keras.utils.set_random_seed(0)
    model = models.build_model(cfg, META)
    seq = np.array([0.1, 0.2, 0.3, 0.4, 0.5], dtype=np.float32)
    bare = np.asarray(model(seq[None, :, None]))
    for total in (8, 20, 40):
        np.testing.assert_allclose(np.asarray(model(padded(seq, total))), bare, atol=1e-6)
    # Sanity: the model is not constant, so the equality above means something.
    other = np.asarray(model(padded(seq[::-1], 20)))
    assert not np.allclose(other, bare, atol=1e-6)


def test_stacked_bidirectional_layout():
    model = models.build_model(model_cfg(cell="gru", bidirectional=True, layers=3, units=4, dropout=0.1), META)
    names = [layer.name for layer in model.layers]
    assert names == [
        "steps",
        "mask",
        "bi_gru_1",
        "dropout_1",
        "bi_gru_2",
        "dropout_2",
        "bi_gru_3",
        "dropout_3",
        "classes",
    ]
    assert model.output_shape == (None, 2)
    # GRU(4) on 1 feature: 3 gates x (1*4 + 4*4 + 2*4 biases, reset_after) = 84 per direction.
    assert model.get_layer("bi_gru_1").count_params() == 2 * 84


def test_token_inputs_need_an_embedding():
    meta = {**META, "input": "tokens", "vocab_size": 50}
    with pytest.raises(ValueError, match="model.embedding_dim"):
        models.build_model(model_cfg(), meta)
    model = models.build_model(model_cfg(embedding_dim=6), meta)
    tokens = np.array([[3, 4, 5]], dtype=np.int32)
    padded_tokens = np.array([[3, 4, 5, 0, 0, 0]], dtype=np.int32)  # id 0 is padding
    np.testing.assert_allclose(np.asarray(model(padded_tokens)), np.asarray(model(tokens)), atol=1e-6)


def test_unknown_cell_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown cell type 'lstn'; valid cell types: rnn, lstm, gru"):
        models.build_model(model_cfg(cell="lstn"), META)


@pytest.mark.parametrize("name,cls", [("sgd", "SGD"), ("adam", "Adam"), ("rmsprop", "RMSprop")])
def test_optimizers_clip_by_global_norm(name, cls):
    opt = models.build_optimizer(
        OmegaConf.create(
            dict(
                name=name,
                learning_rate=0.5,
                clip_global_norm=5.0,
                momentum=0.0,
                beta_1=0.9,
                beta_2=0.999,
                rho=0.9,
                epsilon=1e-7,
                lr_decay=1.0,
                lr_decay_start=0,
            )
        )
    )
    assert type(opt).__name__ == cls
    assert opt.global_clipnorm == 5.0
    assert float(opt.learning_rate) == pytest.approx(0.5)


def test_learning_rate_is_held_then_decayed():
    schedule = models.lr_schedule(OmegaConf.create(dict(learning_rate=1.0, lr_decay=0.5, lr_decay_start=4)))
    assert [schedule(e) for e in range(7)] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.125]


# --- Language models -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_state_is_carried_from_one_window_to_the_next(cell):
    keras.utils.set_random_seed(0)
    model = models.build_language_model(lm_cfg(cell=cell), LM_META, batch_size=1)
    w1, w2 = np.array([[1, 2, 3, 4]]), np.array([[5, 6, 7, 8]])
    model(w1, training=False)
    carried = np.asarray(model(w2, training=False))
    models.reset_states(model)
    fresh = np.asarray(model(w2, training=False))
    assert not np.allclose(carried, fresh, atol=1e-4), "window 2 ignored the state left by window 1"
    # A reset state is a zero state: the stateless export model agrees with it.
    stateless = models.build_language_model(lm_cfg(cell=cell), LM_META)
    stateless.set_weights(model.get_weights())
    np.testing.assert_allclose(np.asarray(stateless(w2, training=False)), fresh, atol=1e-5)
    # ... and reading both windows at once equals reading them one after the other with the state carried.
    np.testing.assert_allclose(np.asarray(stateless(np.hstack([w1, w2])))[:, 4:], carried, atol=1e-5)


def test_language_model_cannot_be_bidirectional():
    with pytest.raises(ValueError, match="bidirectional=false"):
        models.build_language_model(lm_cfg(bidirectional=True), LM_META)


def test_sequence_loss_is_the_per_token_loss_times_the_steps():
    y = np.array([[1, 2, 3]])
    logits = np.random.default_rng(0).normal(size=(1, 3, 20)).astype("float32")
    per_token = float(np.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)))
    assert float(models.SequenceLoss(3)(y, logits)) == pytest.approx(3 * per_token, rel=1e-6)


def test_unrolled_layers_compute_the_same_function():
    keras.utils.set_random_seed(0)
    rolled = models.build_language_model(lm_cfg(), LM_META, batch_size=1)
    unrolled = models.build_language_model(lm_cfg(unroll=True), LM_META, batch_size=1)
    assert unrolled.get_layer("lstm_1").unroll and not rolled.get_layer("lstm_1").unroll
    unrolled.set_weights(rolled.get_weights())
    tokens = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_allclose(unrolled(tokens), rolled(tokens), atol=1e-5)


def test_the_stateless_language_model_reads_any_length_in_a_graph():
    # Unrolling is for training's fixed windows; the exported model is traced once for every length (sampling).
    stateless = models.build_language_model(lm_cfg(unroll=True), LM_META)
    assert not stateless.get_layer("lstm_1").unroll
    traced = tf.function(stateless, input_signature=[tf.TensorSpec([None, None], tf.int32)])
    for length in (1, 4, 9):
        assert traced(np.zeros((2, length), np.int32)).shape == (2, length, LM_META["vocab_size"])


# --- Precision ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bfloat16_output", "mixed_bfloat16"])
def test_reduced_precision_keeps_float32_outputs_and_float32_weights(precision):
    keras.utils.set_random_seed(0)
    lm = models.build_language_model(lm_cfg(), LM_META, batch_size=2, precision=precision)
    logits = lm(np.array([[1, 2, 3], [4, 5, 6]]))
    assert logits.dtype == "float32" and logits.shape == (2, 3, 20)
    assert all(w.dtype == "float32" for w in lm.weights)
    assert lm.get_layer("logits").compute_dtype == "bfloat16"
    classifier = models.build_classifier(model_cfg(), META, precision=precision)
    probs = np.asarray(classifier(padded([0.1, 0.2], 4)))
    assert probs.dtype == np.float32 and probs.sum() == pytest.approx(1.0, abs=1e-6)


def test_float32_lm_and_reduced_precision_agree_closely():
    keras.utils.set_random_seed(0)
    full = models.build_language_model(lm_cfg(), LM_META)
    half = models.build_language_model(lm_cfg(), LM_META, precision="bfloat16_output")
    half.set_weights(full.get_weights())  # same layers, same weights: only the output layer's arithmetic differs
    tokens = np.array([[1, 2, 3, 4, 5, 6]])
    np.testing.assert_allclose(half(tokens), full(tokens), atol=0.05)


def test_bfloat16_grad_matmul_is_float32_forward_and_bfloat16_backward():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(8, 16)), tf.float32)
    w = tf.constant(rng.normal(size=(16, 32)), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, w])
        fast = models.matmul_bfloat16_grad(x, w)
        exact = tf.matmul(x, w)
        weights = tf.constant(rng.normal(size=(8, 32)), tf.float32)
        fast_loss, exact_loss = tf.reduce_sum(fast * weights), tf.reduce_sum(exact * weights)
    np.testing.assert_array_equal(fast, exact)  # the forward pass (logits, loss) is untouched float32
    for ours, reference in zip(tape.gradient(fast_loss, [x, w]), tape.gradient(exact_loss, [x, w]), strict=True):
        assert ours.dtype == tf.float32
        np.testing.assert_allclose(ours, reference, rtol=0.02, atol=0.05)  # bfloat16: 8 significant bits
        assert not np.array_equal(ours, reference)  # it really ran in bfloat16


def test_bfloat16_grad_lm_trains_like_float32_and_exports_plain_keras(tmp_path):
    keras.utils.set_random_seed(0)
    tokens, targets = np.array([[1, 2, 3, 4], [5, 6, 7, 8]]), np.array([[2, 3, 4, 5], [6, 7, 8, 9]])
    trained = {}
    for precision in ("float32", "bfloat16_grad"):
        lm = models.build_language_model(lm_cfg(), LM_META, batch_size=2, precision=precision)
        if trained:
            lm.set_weights(trained["float32"][0])  # same weights, same layout
        lm.compile(optimizer=keras.optimizers.SGD(1.0), loss=models.SequenceLoss(4))
        start = lm.get_weights()
        lm.train_on_batch(tokens, targets)
        trained[precision] = (start, lm.get_weights(), lm)
    lm = trained["bfloat16_grad"][2]
    assert isinstance(lm.get_layer("logits"), models.Bfloat16GradDense)
    start = trained["float32"][0]
    for before, a, b in zip(start, trained["float32"][1], trained["bfloat16_grad"][1], strict=True):
        np.testing.assert_allclose(b, a, atol=2e-3)
        assert np.abs(b - before).max() > 0.01 or np.abs(a - before).max() < 0.01  # every weight learns
    lm.save(tmp_path / "checkpoint.keras")  # a checkpoint reloads with the layer, for resuming
    reloaded = keras.models.load_model(tmp_path / "checkpoint.keras")
    assert isinstance(reloaded.get_layer("logits"), models.Bfloat16GradDense)
    exported = models.build_language_model(lm_cfg(), LM_META, precision="bfloat16_grad")
    assert type(exported.get_layer("logits")) is keras.layers.Dense  # the logged model needs no rnnlab code
    exported.set_weights(lm.get_weights())
    models.reset_states(lm)
    np.testing.assert_allclose(exported(tokens), lm(tokens), rtol=1e-5, atol=1e-5)


def test_auto_precision_follows_the_machine(monkeypatch):
    """The machine's answers (bfloat16 instructions, a GPU) injected, so every branch runs on any machine."""
    monkeypatch.setattr(models, "gpu_available", lambda: False)
    monkeypatch.setattr(models, "cpu_bf16_matmul", lambda: "avx512_bf16")
    assert models.resolve_precision("auto") == "bfloat16_grad"
    assert models.resolve_precision("auto", "classification") == "float32"
    assert models.resolve_precision("bfloat16_grad", "classification") == "float32"  # nothing to gain there
    assert models.resolve_precision("mixed_bfloat16", "classification") == "mixed_bfloat16"
    monkeypatch.setattr(models, "cpu_bf16_matmul", lambda: None)
    assert models.resolve_precision("auto") == "float32"
    assert models.resolve_precision("bfloat16_grad") == "bfloat16_grad"  # asked for: honoured, if slower
    assert models.resolve_precision("mixed_float16") == "mixed_float16"
    monkeypatch.setattr(models, "cpu_bf16_matmul", lambda: "amx_bf16")
    monkeypatch.setattr(models, "gpu_available", lambda: True)
    assert models.resolve_precision("auto") == "float32"


CPUINFO = """processor\t: {n}
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 avx512f {extra}
"""


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("avx512_vnni avx512_bf16 avx512_vbmi", "avx512_bf16"),  # AMD Zen 4, Intel Cooper Lake
        ("amx_tile amx_int8 amx_bf16 avx512_bf16", "amx_bf16"),  # Sapphire Rapids has both: AMX is faster
        ("avx512_vnni avx_vnni", None),  # Zen 3, Ice Lake: no bfloat16 instructions
        ("avx512_bf16x amx_bf16_fake", None),  # whole flags only, not substrings
    ],
)
def test_cpu_bf16_flags_are_read_from_cpuinfo(tmp_path, extra, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("\n".join(CPUINFO.format(n=n, extra=extra) for n in range(2)))
    assert models.cpu_bf16_matmul(cpuinfo) == expected


def test_no_cpuinfo_means_no_bfloat16_instructions(tmp_path):
    assert models.cpu_bf16_matmul(tmp_path / "missing") is None  # not Linux: float32, no crash
