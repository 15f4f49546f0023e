"""A decoder layer's parameter tensors, declared once per architecture.

The arena layout (kunserve/layout.py), the weight views (kunserve/model/decoder.py), the
checkpoint loader and the dummy initialisation (kunserve/model/weights.py) and the cost
model's default estimate (kunserve/engine/cost_model.py) all read a layer from this list,
so an architecture names its tensors in one place: its module in kunserve/arch/.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


class LayerDims(Protocol):
    """What a layer schema reads of a model's spec (kunserve/arch/spec.py `ModelSpec`)."""

    @property
    def hidden_size(self) -> int: ...

    @property
    def intermediate_size(self) -> int: ...

    @property
    def q_size(self) -> int: ...

    @property
    def kv_size(self) -> int: ...

    @property
    def qkv_bias(self) -> bool: ...

    @property
    def o_bias(self) -> bool: ...


@dataclass(frozen=True)
class LayerTensor:
    """One parameter of a decoder layer as kunserve holds it.

    `name` is its field of `LayerWeights` and its slice of the arena slot. A fused parameter
    (q/k/v as `qkv`, gate/up as `gate_up`) lists several checkpoint tensors: they are stacked
    along dim 0, in the listed order.
    """

    name: str
    shape: tuple[int, ...]
    checkpoint_names: tuple[str, ...]  # relative to the layer's prefix, "model.layers.{i}."
    is_norm: bool = False  # an RMSNorm weight: dummy weights set it to ones, not to noise

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_matrix(self) -> bool:
        """A GEMM's weight (biases and norms are vectors)."""
        return len(self.shape) == 2

    def checkpoint_keys(self, layer: int) -> list[str]:
        """The checkpoint tensors of layer `layer` that this parameter is made of."""
        return [f"model.layers.{layer}.{name}" for name in self.checkpoint_names]


def matrix_params(tensors: Iterable[LayerTensor]) -> int:
    """Elements of a layer's GEMM weights: what a token's FLOPs and a step's weight reads scale with."""
    return sum(t.numel for t in tensors if t.is_matrix)
