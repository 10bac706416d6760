"""LSTM with peephole connections: each gate also sees the cell state (the input and forget gates the previous one,
the output gate the new one) through a diagonal weight. Gers & Schmidhuber (2000), "Recurrent nets that time and
count", IJCNN; the "vanilla" LSTM of Greff et al. (2017)."""

import keras

from pipeline.cells import Cell
from pipeline.variants._lstm import LSTMVariantCell


@keras.saving.register_keras_serializable(package="rnnlab")
class PeepholeLSTMCell(LSTMVariantCell):
    PEEPHOLES = True


CELL = Cell("peephole", "PeepholeLSTM", PeepholeLSTMCell, gates=4)
