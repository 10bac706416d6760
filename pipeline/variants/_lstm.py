"""The LSTM family as one Keras cell with switches, so that each variant of Greff et al. (2017), "LSTM: A Search Space
Odyssey", IEEE TNNLS 28(10), is one change to the same arithmetic. Without switches it is Keras' LSTM (no peepholes,
the forget gate's bias starting at 1), the reference the variants are compared with.

    z = tanh(x W_z + h R_z + b_z)                  block input
    i = sigmoid(x W_i + h R_i + p_i * c + b_i)     input gate
    f = sigmoid(x W_f + h R_f + p_f * c + b_f)     forget gate (CIFG: 1 - i; NFG: 1)
    c' = f * c + i * z
    o = sigmoid(x W_o + h R_o + p_o * c' + b_o)    output gate
    h' = o * tanh(c')                              (NOAF: o * c')

Peepholes (p_*) only where ``PEEPHOLES`` is set. The kernels hold the gates' blocks in the order i, f, z, o (i, z, o
without a forget gate of its own), as Keras' LSTM does.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from pipeline.variants._base import VariantCell


class LSTMVariantCell(VariantCell):
    """An LSTM cell with the switches of Greff et al. 2017; subclasses set them."""

    PEEPHOLES = False  # gates see the cell state (p_i, p_f, p_o)
    FORGET = "gate"  # "gate" (its own weights), "coupled" (1 - i: CIFG) or "none" (1: NFG)
    OUTPUT_ACTIVATION = True  # h' = o * tanh(c'); False: h' = o * c' (NOAF)

    @property
    def state_size(self) -> list[int]:
        return [self.units, self.units]  # h, c

    @property
    def blocks(self) -> int:
        return 4 if self.FORGET == "gate" else 3

    def build(self, input_shape: Any) -> None:
        n = self.blocks * self.units
        self.kernel = self.add_weight(shape=(input_shape[-1], n), initializer=self.kernel_initializer, name="kernel")
        self.recurrent_kernel = self.add_weight(
            shape=(self.units, n), initializer=self.recurrent_initializer, name="recurrent_kernel"
        )
        self.bias = self.add_weight(shape=(n,), initializer=self._bias_init, name="bias")
        if self.PEEPHOLES:
            self.peepholes = self.add_weight(shape=(3, self.units), initializer="zeros", name="peepholes")

    def _bias_init(self, shape: Any, dtype: Any = None) -> Any:
        """The forget gate's bias starts at 1 (Gers et al. 2000; Keras' ``unit_forget_bias``), the others as asked."""
        u = self.units
        if self.FORGET != "gate":
            return self.bias_initializer((3 * u,), dtype=dtype)
        rest = self.bias_initializer((2 * u,), dtype=dtype)
        return ops.concatenate([self.bias_initializer((u,), dtype=dtype), ops.ones((u,), dtype=dtype), rest])

    def call(self, inputs: Any, states: Any, training: bool = False) -> tuple[Any, list[Any]]:
        h, c = states
        pre = ops.matmul(inputs, self.kernel) + ops.matmul(h, self.recurrent_kernel) + self.bias
        if self.FORGET == "gate":
            x_i, x_f, x_z, x_o = ops.split(pre, 4, axis=-1)
        else:
            x_i, x_z, x_o = ops.split(pre, 3, axis=-1)
        p_i, p_f, p_o = (self.peepholes[0], self.peepholes[1], self.peepholes[2]) if self.PEEPHOLES else (0, 0, 0)
        i = ops.sigmoid(x_i + p_i * c)
        if self.FORGET == "gate":
            f = ops.sigmoid(x_f + p_f * c)
        else:
            f = 1.0 - i if self.FORGET == "coupled" else ops.ones_like(i)
        c_new = f * c + i * ops.tanh(x_z)
        o = ops.sigmoid(x_o + p_o * c_new)
        h_new = o * (ops.tanh(c_new) if self.OUTPUT_ACTIVATION else c_new)
        return h_new, [h_new, c_new]
