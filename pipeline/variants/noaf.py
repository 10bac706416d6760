"""No output activation function (NOAF): h' = o * c', the cell state leaves unsquashed. Greff et al. (2017), "LSTM:
A Search Space Odyssey", IEEE TNNLS 28(10): removing the output activation hurt on every task they ran."""

import keras

from pipeline.cells import Cell
from pipeline.variants._lstm import LSTMVariantCell


@keras.saving.register_keras_serializable(package="rnnlab")
class NOAFCell(LSTMVariantCell):
    OUTPUT_ACTIVATION = False


CELL = Cell("noaf", "NOAF", NOAFCell, gates=4)
