"""Coupled input and forget gate (CIFG): the forget gate is one minus the input gate, f = 1 - i, so the cell keeps
exactly what it does not write, with one gate's weights fewer. Greff et al. (2017), "LSTM: A Search Space Odyssey",
IEEE TNNLS 28(10), section II-C; the GRU couples its gates the same way (Cho et al. 2014)."""

import keras

from pipeline.cells import Cell
from pipeline.variants._lstm import LSTMVariantCell


@keras.saving.register_keras_serializable(package="rnnlab")
class CIFGCell(LSTMVariantCell):
    FORGET = "coupled"


CELL = Cell("cifg", "CIFG", CIFGCell, gates=3)
