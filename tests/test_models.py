import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline import models

META = {
    "name": "toy",
    "kind": "classification",
    "input": "dense",
    "features": 1,
    "pad_value": -1.0,
    "num_classes": 2,
}


def model_cfg(**kw):
    base = dict(
        cell="lstm",
        bidirectional=False,
        layers=1,
        units=8,
        dropout=0.0,
        recurrent_dropout=0.0,
        embedding_dim=None,
    )
    return OmegaConf.create({**base, **kw})


def padded(seq, total):
    out = np.full((1, total, 1), -1.0, dtype=np.float32)
    out[0, : len(seq), 0] = seq
    return out


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
    bare = model.predict(seq[None, :, None], verbose=0)
    for total in (8, 20, 40):
        np.testing.assert_allclose(model.predict(padded(seq, total), verbose=0), bare, atol=1e-6)
    # Sanity: the model is not constant, so the equality above means something.
    other = model.predict(padded(seq[::-1], 20), verbose=0)
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
    np.testing.assert_allclose(model.predict(padded_tokens, verbose=0), model.predict(tokens, verbose=0), atol=1e-6)


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
