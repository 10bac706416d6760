"""The fused training kernels compute what Keras' layers and TensorFlow's loss compute: outputs, carried states and
gradients against the reference within float32 rounding (stated tolerances), the same training steps, and Keras'
own loop wherever they do not apply."""

from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import cells, kernels, models, tasks
from tests.conftest import LM_META, lm_cfg

# float32 sums in a different order: outputs agree to a few ulps, gradients through 7 steps to ~1e-5 relative.
OUT_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=2e-5)
SLOWER = pytest.mark.integration  # the GRU and SimpleRNN variants: the LSTM's runs in the fast tier
PAIRS = [
    pytest.param("lstm", keras.layers.LSTM, kernels.FusedLSTM, id="lstm"),
    pytest.param("gru", keras.layers.GRU, kernels.FusedGRU, id="gru", marks=SLOWER),
    pytest.param("rnn", keras.layers.SimpleRNN, kernels.FusedSimpleRNN, id="rnn", marks=SLOWER),
]


def test_sparse_xent_matches_tensorflow_values_and_gradients():
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(64, 300)) * 4, tf.float32)  # spread logits: probabilities down to ~1e-12
    labels = tf.constant(rng.integers(0, 300, 64), tf.int32)
    weights = tf.constant(rng.normal(size=64), tf.float32)  # a gradient that differs per row
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        ours = kernels.sparse_xent(labels, logits)
        reference = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        ours_sum, ref_sum = tf.reduce_sum(ours * weights), tf.reduce_sum(reference * weights)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tape.gradient(ours_sum, logits), tape.gradient(ref_sum, logits), rtol=1e-5, atol=1e-6)


def test_sparse_xent_is_exact_where_a_probability_underflows():
    logits = tf.constant([[0.0, 200.0, 0.0], [1.0, 2.0, 3.0]])
    labels = tf.constant([0, 2])
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = kernels.sparse_xent(labels, logits)
    gradient = tape.gradient(loss, logits)
    reference = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits).numpy()
    assert reference[0] == pytest.approx(200.0)  # probability e^-200: zero in float32
    np.testing.assert_allclose(loss.numpy(), reference, rtol=1e-6)
    np.testing.assert_allclose(gradient, [[-1, 1, 0], [0.090031, 0.244728, -0.334759]], atol=1e-6)


@pytest.mark.parametrize("nats", [60.0, 68.0, 69.5, 80.0])  # either side of the 1e-30 (69.08 nats) switch
def test_sparse_xent_is_exact_on_both_sides_of_its_switch_to_logsumexp(nats):
    logits = tf.constant([[0.0, nats, 0.0], [nats, 0.0, 1.0]])
    labels = tf.constant([0, 1])
    loss = kernels.sparse_xent(labels, logits).numpy()
    reference = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits).numpy()
    np.testing.assert_allclose(loss, reference, rtol=1e-6)
    assert loss == pytest.approx([nats, nats], rel=1e-6)


def run_twice(layer: keras.layers.Layer, x: tf.Tensor) -> tuple:
    """Two consecutive windows through a stateful layer (the second starts from the first's state): outputs,
    gradients of a loss reading both into the input and every weight, and the states after."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        first, second = layer(x, training=True), layer(x[:, ::-1], training=True)
        loss = tf.reduce_sum(tf.sin(first) * 1.7) + tf.reduce_sum(second**2)
    grads = tape.gradient(loss, [x, *layer.trainable_weights])
    return (first, second), grads, [s.numpy() for s in layer.states]


@pytest.mark.parametrize("cell,keras_layer,fused_layer", PAIRS)
def test_fused_layer_matches_keras_outputs_states_and_gradients(cell, keras_layer, fused_layer):
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(4, 7, 5)), tf.float32)
    reference = keras_layer(6, return_sequences=True, stateful=True, unroll=True)
    fused = fused_layer(6, return_sequences=True, stateful=True, unroll=True)
    for layer in (reference, fused):
        layer.build((4, 7, 5))
    weights = [w + rng.normal(size=w.shape).astype("float32") * 0.3 for w in reference.get_weights()]  # biases too
    results = []
    for layer in (reference, fused):
        layer.set_weights(weights)
        for state in layer.states:
            state.assign(np.full(state.shape, 0.1, "float32"))  # a carried state, not zeros
        results.append(run_twice(layer, x))
    (ref_out, ref_grads, ref_states), (out, grads, states) = results
    for a, b in zip(out + tuple(states), ref_out + tuple(ref_states), strict=True):
        np.testing.assert_allclose(a, b, **OUT_TOL)
    assert len(grads) == len(ref_grads) == 4  # input, kernel, recurrent kernel, bias
    for ours, theirs in zip(grads, ref_grads, strict=True):
        assert np.abs(theirs).max() > 1e-3  # every gradient is really there
        np.testing.assert_allclose(ours, theirs, **GRAD_TOL)


def test_fused_layer_falls_back_to_keras_loop_where_it_does_not_apply():
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(3, 6, 4)), tf.float32)
    mask = tf.constant(np.arange(6)[None, :] < np.array([[6], [4], [2]]))
    fused = kernels.FusedLSTM(5, return_sequences=True, recurrent_dropout=0.0, unroll=True)
    reference = keras.layers.LSTM(5, return_sequences=True, unroll=True)
    fused.build((3, 6, 4))
    reference.build((3, 6, 4))
    reference.set_weights(fused.get_weights())
    assert not fused.fusable(mask)  # a mask: Keras' loop
    np.testing.assert_array_equal(fused(x, mask=mask), reference(x, mask=mask))
    dropping = kernels.FusedLSTM(5, recurrent_dropout=0.3)
    dropping.build((3, 6, 4))
    assert not dropping.fusable(None)
    assert fused.fusable(None)


def lm_pair(cell: str, wavefront: bool = False, **model: Any) -> tuple[keras.Model, keras.Model]:
    """The same stateful language model (2 layers unless ``model`` says otherwise; batch 2) built with Keras' layers
    and loss and with the fused ones, compiled for training, from the same weights."""
    built = []
    for fused in (False, True):
        keras.utils.set_random_seed(0)
        cfg = lm_cfg(cell=cell, **model)
        lm = models.build_language_model(cfg, LM_META, batch_size=2, fused=fused, wavefront=fused and wavefront)
        lm.compile(optimizer=keras.optimizers.SGD(1.0, global_clipnorm=5.0), loss=models.SequenceLoss(4, fused=fused))
        built.append(lm)
    return built[0], built[1]


@pytest.mark.parametrize("cell", ["lstm", pytest.param("gru", marks=SLOWER), pytest.param("rnn", marks=SLOWER)])
def test_fused_language_model_trains_the_same_steps_as_keras(cell):
    reference, fused = lm_pair(cell)
    assert isinstance(fused.get_layer(f"{cell}_1"), cells.get(cell).fused_class())
    for a, b in zip(reference.get_weights(), fused.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # same initialisation: the fused layers are Keras' layers
    rng = np.random.default_rng(3)
    windows = [(rng.integers(1, 20, (2, 4)), rng.integers(1, 20, (2, 4)))] * 5  # one window, learnt step by step
    losses = {}
    for name, lm in (("keras", reference), ("fused", fused)):
        losses[name] = [float(lm.train_on_batch(x, y)) for x, y in windows]  # state carried across windows
    np.testing.assert_allclose(losses["fused"], losses["keras"], rtol=1e-5)
    assert losses["keras"][-1] < losses["keras"][0]  # it learnt something
    for a, b in zip(reference.get_weights(), fused.get_weights(), strict=True):  # 5 steps at lr 1.0 amplify rounding
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=5e-5)


def test_fused_language_model_checkpoints_and_exports_plain_keras(tmp_path):
    _, fused = lm_pair("lstm")
    tokens = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    fused.train_on_batch(tokens, np.array([[2, 3, 4, 5], [6, 7, 8, 9]]))
    fused.save(tmp_path / "checkpoint.keras")  # a checkpoint reloads with the fused layers and loss, for resuming
    reloaded = keras.models.load_model(tmp_path / "checkpoint.keras")
    assert isinstance(reloaded.get_layer("lstm_1"), kernels.FusedLSTM) and reloaded.loss.fused
    exported = models.build_language_model(lm_cfg(), LM_META)  # what MLflow gets: no rnnlab code needed
    assert type(exported.get_layer("lstm_1")) is keras.layers.LSTM
    exported.set_weights(fused.get_weights())
    models.reset_states(fused)
    np.testing.assert_allclose(exported(tokens), fused(tokens), **OUT_TOL)


@pytest.mark.parametrize("steps", [6, 2, 1])  # a loop of 4 full waves; none (fewer steps than layers); one step
def test_wavefront_computes_what_the_layers_compute_one_after_another(steps):
    """Three stacked layers (the loop is written for any number) in one wavefront against three ``lstm_sequence``
    calls: outputs, every layer's last state, and the gradients into the inputs, the states and every weight."""
    rng = np.random.default_rng(7)
    batch, units = 3, 5
    w = lambda *shape: tf.constant(rng.uniform(-0.5, 0.5, shape), tf.float32)  # noqa: E731
    xz, states = w(steps, batch, 4 * units), [w(batch, units) for _ in range(6)]
    rks = [w(units, 4 * units) for _ in range(3)]
    kernels_, biases = [w(units, 4 * units) for _ in range(2)], [w(4 * units) for _ in range(2)]
    upstream = [w(steps, batch, units), *[w(batch, units) for _ in range(6)]]  # gradients into every output
    inputs = [xz, *states, *rks, *kernels_, *biases]

    def weighted(outputs):
        return sum(tf.reduce_sum(o * u) for o, u in zip(outputs, upstream, strict=True))

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(inputs)
        stacked = [tf.concat([k, rk], axis=0) for k, rk in zip(kernels_, rks[1:], strict=True)]
        out, last = kernels.lstm_stack_sequence(xz, states, rks[0], stacked, biases)
        ours = weighted([out, *last])
        seq, reference_last = xz, []
        for layer in range(3):
            if layer:
                flat = tf.reshape(seq, [-1, units]) @ kernels_[layer - 1] + biases[layer - 1]
                seq = tf.reshape(flat, [steps, batch, -1])
            seq, h, c = kernels.lstm_sequence(seq, states[2 * layer], states[2 * layer + 1], rks[layer])
            reference_last += [h, c]
        reference = weighted([seq, *reference_last])
    np.testing.assert_allclose(out, seq, **OUT_TOL)
    for a, b in zip(last, reference_last, strict=True):
        np.testing.assert_allclose(a, b, **OUT_TOL)
    for a, b in zip(tape.gradient(ours, inputs), tape.gradient(reference, inputs), strict=True):
        assert float(tf.reduce_max(tf.abs(b))) > 0  # every input matters: the comparison can fail
        np.testing.assert_allclose(a, b, **GRAD_TOL)


STEPS, BATCH, UNITS = 7, 2, 3  # shapes of the traced loops below


def spec(*shape: int) -> tf.TensorSpec:
    return tf.TensorSpec(shape, tf.float32)


def lowered_ops(loop: Any, args: tuple) -> list[str]:
    """The op types of ``loop``'s graph and of the functions it calls (a while loop's body) traced for ``args``
    (specs): what XLA lowers at a process's first step."""
    graph = loop.get_concrete_function(*args).graph.as_graph_def()
    return [node.op for node in graph.node] + [n.op for f in graph.library.function for n in f.node_def]


@pytest.mark.parametrize(
    ("loop", "shapes", "transcendental"),
    [  # sigmoid (all sigmoid gates), tanh g, tanh c per LSTM step; the wavefront's two ends: one layer's step each
        pytest.param(kernels._stack_forward_xla, "stack", 3 * 2 + 3 * 2, id="lstm-wavefront"),
        pytest.param(kernels._lstm_forward_xla, "lstm", 3, id="lstm"),
        pytest.param(kernels._gru_forward_xla, "gru", 2, id="gru"),  # sigmoid (z, r), tanh
        pytest.param(kernels._rnn_forward_xla, "rnn", 1, id="rnn"),
    ],
)
def test_forward_loops_lower_one_step_whatever_the_length(loop, shapes, transcendental):
    """Every process lowers the loops to XLA at its first step, about 5 ms per sigmoid or tanh op: a forward loop
    is a while loop, whose step is lowered once for any number of steps, and one sigmoid op per step serves all of
    a cell's sigmoid gates."""
    u, state = UNITS, spec(BATCH, UNITS)
    counts = []
    for steps in (STEPS, 2 * STEPS):
        xz = spec(steps, BATCH, 4 * u)
        args = {
            "stack": (xz, [state] * 4, spec(u, 4 * u), [spec(2 * u, 4 * u)], [spec(4 * u)]),
            "lstm": (xz, state, state, spec(u, 4 * u)),
            "gru": (spec(steps, BATCH, 3 * u), state, spec(u, 3 * u), spec(3 * u)),
            "rnn": (spec(steps, BATCH, u), state, spec(u, u)),
        }[shapes]
        ops = lowered_ops(loop, args)
        assert "While" in ops or "StatelessWhile" in ops
        counts.append(sum(t in ("Sigmoid", "Tanh", "Exp") for t in ops))
    assert counts == [transcendental] * 2


@pytest.mark.parametrize("shapes", ["stack", "lstm", "gru", "rnn"])
def test_backward_loops_take_their_steps_from_one_unstack(shapes):
    """A backward loop's per-step slices come from one ``tf.unstack`` per tensor, not one index op per step."""
    u, state = UNITS, spec(BATCH, UNITS)
    seq = lambda width: spec(STEPS, BATCH, width)  # noqa: E731
    loop, args = {
        "stack": (
            kernels._stack_backward_xla,
            (seq(u), [state] * 4, spec(u, 4 * u), [spec(2 * u, 4 * u)],
             [[seq(u), seq(u), seq(5 * u)], [seq(2 * u), seq(u), seq(5 * u)]]),
        ),
        "lstm": (kernels._lstm_backward_xla, (seq(u), state, state, spec(u, 4 * u), seq(u), seq(u), seq(5 * u))),
        "gru": (kernels._gru_backward_xla, (seq(u), state, spec(u, 3 * u), seq(u), seq(4 * u))),
        "rnn": (kernels._rnn_backward_xla, (seq(u), state, spec(u, u), seq(u), seq(u))),
    }[shapes]  # fmt: skip
    ops = lowered_ops(loop, args)
    assert "StridedSlice" not in ops
    assert ops.count("Unpack") >= 1


def test_wavefront_language_model_trains_the_same_steps_as_keras():
    reference, fused = lm_pair("lstm", wavefront=True)
    stack = fused.get_layer("lstm_stack")
    assert isinstance(stack, kernels.FusedLSTMStack) and [la.name for la in stack.stack] == ["lstm_1", "lstm_2"]
    for a, b in zip(reference.get_weights(), fused.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the same weights in the same order: the export copies them
    rng = np.random.default_rng(3)
    windows = [(rng.integers(1, 20, (2, 4)), rng.integers(1, 20, (2, 4))) for _ in range(5)]
    losses = {}
    for name, lm in (("keras", reference), ("fused", fused)):
        losses[name] = [float(lm.train_on_batch(x, y)) for x, y in windows]  # state carried across windows
    np.testing.assert_allclose(losses["fused"], losses["keras"], rtol=1e-5)
    for layer in ("lstm_1", "lstm_2"):  # the carried states, each layer's own
        for a, b in zip(reference.get_layer(layer).states, stack.stack[int(layer[-1]) - 1].states, strict=True):
            np.testing.assert_allclose(b, a, **OUT_TOL)
    models.reset_states(fused)
    assert all(not np.any(s.numpy()) for layer in stack.stack for s in layer.states)
    for a, b in zip(reference.get_weights(), fused.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=5e-5)


def test_wavefront_language_model_resumes_and_exports_plain_keras(tmp_path):
    _, fused = lm_pair("lstm", wavefront=True)
    tokens, targets = np.array([[1, 2, 3, 4], [5, 6, 7, 8]]), np.array([[2, 3, 4, 5], [6, 7, 8, 9]])
    fused.train_on_batch(tokens, targets)
    fused.save(tmp_path / "checkpoint.keras")
    reloaded = keras.models.load_model(tmp_path / "checkpoint.keras")
    assert isinstance(reloaded.get_layer("lstm_stack"), kernels.FusedLSTMStack)
    models.reset_states(fused)  # a checkpoint is taken between epochs, whose first window starts from zero states
    np.testing.assert_allclose(reloaded.train_on_batch(tokens, targets), fused.train_on_batch(tokens, targets))
    exported = models.build_language_model(lm_cfg(), LM_META)
    exported.set_weights(fused.get_weights())
    models.reset_states(fused)
    np.testing.assert_allclose(exported(tokens), fused(tokens), **OUT_TOL)


@pytest.mark.parametrize(
    "model",
    [{"dropout": 0.2}, {"recurrent_dropout": 0.2}, {"layers": 1}, {"cell": "gru"}],
    ids=["dropout", "recurrent_dropout", "one_layer", "gru"],
)
def test_wavefront_applies_to_stacked_lstm_layers_without_dropout_only(model):
    lm = models.build_language_model(lm_cfg(**model), LM_META, batch_size=2, fused=True, wavefront=True)
    assert not any(isinstance(layer, kernels.FusedLSTMStack) for layer in lm.layers)
    assert lm.get_layer(f"{cells.prefix(model.get('cell', 'lstm'))}_1").stateful


def test_kernels_follow_the_machine_and_the_task(monkeypatch, make_cfg):
    monkeypatch.setattr(models, "gpu_available", lambda: False)
    assert models.resolve_kernels("auto") == "fused"
    assert models.resolve_kernels("keras") == "keras"
    monkeypatch.setattr(models, "gpu_available", lambda: True)
    assert models.resolve_kernels("auto") == "keras"  # cuDNN
    assert models.resolve_kernels("fused") == "fused"
    from pipeline import config, data, prepare

    cfg = make_cfg("data.n_train=32", "data.n_val=16", "data.n_test=16", "trainer.kernels=fused")
    prepare.run(cfg)
    task = tasks.make(cfg, data.load(cfg.paths.data, cfg.data.name))
    assert task.kernels == "keras"  # a classifier trains with Keras' layers whatever the setting
    with pytest.raises(config.ConfigError, match="trainer.kernels"):
        config.validate(make_cfg("trainer.kernels=fast"), "config")


@pytest.mark.parametrize("momentum", [0.0, pytest.param(0.9, marks=SLOWER)])
def test_folded_clipping_sgd_takes_keras_steps(momentum):
    """Clipping folded into the learning rate: the same weights as Keras' SGD clipping every gradient, with the
    clip binding (norm 0.5) and an embedding whose gradient is sparse, token 1 three times in the batch."""
    tokens = np.array([[1, 2, 1, 4], [5, 1, 7, 8]])
    targets = np.array([[2, 3, 4, 5], [6, 7, 8, 9]])
    trained = []
    for optimizer in (keras.optimizers.SGD, models.FoldedClipSGD):
        keras.utils.set_random_seed(0)
        lm = models.build_language_model(lm_cfg(), LM_META, batch_size=2, fused=True)
        lm.compile(optimizer=optimizer(1.0, momentum=momentum, global_clipnorm=0.5), loss=models.SequenceLoss(4))
        losses = [float(lm.train_on_batch(tokens, targets)) for _ in range(3)]
        trained.append((losses, lm.get_weights()))
    (ref_losses, reference), (losses, weights) = trained
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for a, b in zip(weights, reference, strict=True):  # float32: the scale applied once instead of twice
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(weights[0], models.build_language_model(lm_cfg(), LM_META).get_weights()[0])


def test_folded_clipping_keeps_a_non_finite_norm_visible():
    variable = keras.Variable(np.ones(3, "float32"))
    optimizer = models.FoldedClipSGD(1.0, global_clipnorm=1.0)
    optimizer.apply([tf.constant([np.inf, 1.0, 1.0])], [variable])
    assert np.isnan(variable.numpy()).all()  # as Keras: the NaN reaches the weights and the divergence guard
