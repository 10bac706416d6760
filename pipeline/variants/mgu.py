"""Minimal gated unit (MGU): one gate, used both to read the state into the candidate and to mix old and new,

    f = sigmoid(x W_f + h U_f + b_f)
    h~ = tanh(x W_h + (f * h) U_h + b_h)
    h' = (1 - f) * h + f * h~

Zhou, Wu, Zhang & Zhou (2016), "Minimal gated unit for recurrent neural networks", International Journal of
Automation and Computing 13(3), equations (6)-(8)."""

from typing import Any

import keras
from keras import ops

from pipeline.cells import Cell
from pipeline.variants._base import VariantCell


@keras.saving.register_keras_serializable(package="rnnlab")
class MGUCell(VariantCell):
    """The kernels hold the blocks f, h~."""

    def build(self, input_shape: Any) -> None:
        n = 2 * self.units
        self.kernel = self.add_weight(shape=(input_shape[-1], n), initializer=self.kernel_initializer, name="kernel")
        self.recurrent_kernel = self.add_weight(
            shape=(self.units, n), initializer=self.recurrent_initializer, name="recurrent_kernel"
        )
        self.bias = self.add_weight(shape=(n,), initializer=self.bias_initializer, name="bias")

    def call(self, inputs: Any, states: Any, training: bool = False) -> tuple[Any, list[Any]]:
        h = states[0] if isinstance(states, (list, tuple)) else states
        x_f, x_h = ops.split(ops.matmul(inputs, self.kernel) + self.bias, 2, axis=-1)
        r_f, r_h = ops.split(self.recurrent_kernel, 2, axis=-1)
        f = ops.sigmoid(x_f + ops.matmul(h, r_f))
        candidate = ops.tanh(x_h + ops.matmul(f * h, r_h))
        h_new = (1.0 - f) * h + f * candidate
        return h_new, [h_new]


CELL = Cell("mgu", "MGU", MGUCell, gates=2)
