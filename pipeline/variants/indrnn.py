"""Independently recurrent neural network (IndRNN): each unit sees only its own previous value, through one weight,

    h' = relu(x W + u * h + b)

so the recurrent weights can be kept where gradients neither explode nor vanish over long sequences (|u| about 1).
Li, Li, Cook, Zhu & Gao (2018), "Independently Recurrent Neural Network (IndRNN): Building A Longer and Deeper RNN",
CVPR, equation (2). The recurrent weights start uniform in [0, 1]; the paper's bound on |u| is not enforced."""

from typing import Any

import keras
from keras import ops

from pipeline.cells import Cell
from pipeline.variants._base import VariantCell


@keras.saving.register_keras_serializable(package="rnnlab")
class IndRNNCell(VariantCell):
    def __init__(
        self,
        units: int,
        kernel_initializer: Any = "glorot_uniform",
        recurrent_initializer: Any = None,
        bias_initializer: Any = "zeros",
        **kwargs: Any,
    ) -> None:
        recurrent = recurrent_initializer or keras.initializers.RandomUniform(0.0, 1.0)
        super().__init__(units, kernel_initializer, recurrent, bias_initializer, **kwargs)

    def build(self, input_shape: Any) -> None:
        u = self.units
        self.kernel = self.add_weight(shape=(input_shape[-1], u), initializer=self.kernel_initializer, name="kernel")
        self.recurrent_kernel = self.add_weight(shape=(u,), initializer=self.recurrent_initializer, name="recurrent")
        self.bias = self.add_weight(shape=(u,), initializer=self.bias_initializer, name="bias")

    def call(self, inputs: Any, states: Any, training: bool = False) -> tuple[Any, list[Any]]:
        h = states[0] if isinstance(states, (list, tuple)) else states
        h_new = ops.relu(ops.matmul(inputs, self.kernel) + self.recurrent_kernel * h + self.bias)
        return h_new, [h_new]


CELL = Cell("indrnn", "IndRNN", IndRNNCell, gates=1)
