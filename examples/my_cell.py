"""Your own recurrent cell, trained by rnnlab without editing the package:

    PYTHONPATH=examples python -m pipeline.train experiment=toy_dynamic model.cell=my_cell:LeakyCell

A cell is what ``keras.layers.RNN`` runs: ``units``, ``state_size`` and ``call(inputs, states)`` returning the output
and the new states. rnnlab wraps it for stacking, ``bidirectional``, dropout and masking, sizes it for
``model.param_budget``, and sweeps, checkpoints and reports it like a built-in cell. Register it as serializable so
that saved models and checkpoints load it back.
"""

from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="my_cell")
class LeakyCell(keras.layers.Layer):
    """A leaky-integrator RNN: h' = (1 - a) h + a tanh(x W + h U + b), with a learnt rate a per unit in (0, 1)."""

    def __init__(self, units: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.state_size = units
        self.output_size = units

    def build(self, input_shape: Any) -> None:
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), initializer="glorot_uniform", name="kernel")
        self.recurrent = self.add_weight(shape=(self.units, self.units), initializer="orthogonal", name="recurrent")
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")
        self.rate = self.add_weight(shape=(self.units,), initializer="zeros", name="rate")  # sigmoid(0) = 0.5

    def call(self, inputs: Any, states: Any, training: bool = False) -> tuple[Any, list[Any]]:
        h = states[0] if isinstance(states, (list, tuple)) else states
        a = ops.sigmoid(self.rate)
        h_new = (1 - a) * h + a * ops.tanh(ops.matmul(inputs, self.kernel) + ops.matmul(h, self.recurrent) + self.bias)
        return h_new, [h_new]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units}
