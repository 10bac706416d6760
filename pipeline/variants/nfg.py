"""No forget gate (NFG): f = 1, the cell state only accumulates, as in the original LSTM of Hochreiter & Schmidhuber
(1997). Greff et al. (2017), "LSTM: A Search Space Odyssey", IEEE TNNLS 28(10): removing the forget gate hurt on
every task they ran."""

import keras

from pipeline.cells import Cell
from pipeline.variants._lstm import LSTMVariantCell


@keras.saving.register_keras_serializable(package="rnnlab")
class NFGCell(LSTMVariantCell):
    FORGET = "none"


CELL = Cell("nfg", "NFG", NFGCell, gates=3)
