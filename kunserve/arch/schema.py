"""A decoder layer's parameter tensors, declared once per architecture.

The arena layout (kunserve/layout.py), the weight views (kunserve/model/decoder.py), the
checkpoint loader and the dummy initialisation (kunserve/model/weights.py) and the cost
model's default estimate (kunserve/engine/cost_model.py) all read a layer from this list,
so an architecture names its tensors in one place: its module in kunserve/arch/.

Each tensor also says how tensor parallelism (Megatron-style) splits it over t ranks: a
column-parallel GEMM (q/k/v, gate/up) by its output rows, a row-parallel one (o, down) by its
input columns, the rest (norms, o's bias) replicated. Rank r's shard of a fused tensor is the
shards of its parts stacked, so a rank's qkv is [q_r; k_r; v_r].
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
    def num_heads(self) -> int: ...

    @property
    def num_kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def q_size(self) -> int: ...

    @property
    def kv_size(self) -> int: ...

    @property
    def qkv_bias(self) -> bool: ...

    @property
    def o_bias(self) -> bool: ...


# How tensor parallelism splits a tensor (LayerTensor.split).
COLUMN = "column"  # by dim 0, a GEMM's output rows: every rank computes its share of the outputs
ROW = "row"  # by dim 1, a GEMM's input columns: every rank computes partial sums, all-reduced
REPLICATED = "replicated"  # every rank holds all of it


@dataclass(frozen=True)
class ShardUnits:
    """One part of a tensor along its split dimension, in the units tensor parallelism deals
    out whole: `count` attention heads of head_dim rows, or MLP channels of one row each."""

    field: str  # the config field that counts the units, named when they do not divide
    count: int
    size: int = 1  # rows (or columns) per unit
    # KV heads: with more ranks than heads, ranks share a head (each holds a copy) as long as
    # the rank count is a multiple of the heads; query heads and MLP channels never repeat.
    shared: bool = False

    def check(self, tp_size: int) -> None:
        """ValueError naming the field when `tp_size` ranks cannot split these units."""
        if self.count % tp_size == 0 or (self.shared and tp_size % self.count == 0):
            return
        also = " and is not a multiple of it" if self.shared else ""
        raise ValueError(f"tensor_parallel_size: {tp_size} does not divide {self.field} ({self.count}){also}")

    def units_per_rank(self, tp_size: int) -> int:
        self.check(tp_size)
        return max(1, self.count // tp_size)

    def rows(self, rank: int, tp_size: int) -> slice:
        """Rank `rank`'s rows of this part: units [r·n/t, (r+1)·n/t), or with more ranks than
        units the unit r·n/t (rounded down) that it shares with the ranks beside it."""
        per_rank = self.units_per_rank(tp_size)
        first = rank * self.count // tp_size
        return slice(first * self.size, (first + per_rank) * self.size)


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
    split: str = REPLICATED  # COLUMN | ROW | REPLICATED: how tensor parallelism splits it
    # Along the split dimension: one part per checkpoint tensor stacked (COLUMN), or the one
    # part of the input columns (ROW).
    parts: tuple[ShardUnits, ...] = ()

    def __post_init__(self) -> None:
        if self.split not in (COLUMN, ROW, REPLICATED):
            raise ValueError(f"split: expected {COLUMN!r}, {ROW!r} or {REPLICATED!r}, got {self.split!r}")
        if self.split != REPLICATED and sum(p.count * p.size for p in self.parts) != self.shape[self.dim]:
            raise ValueError(f"parts: {self.name}'s parts do not add up to its dim {self.dim} ({self.shape})")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dim(self) -> int:
        """The dimension tensor parallelism splits (0 for a replicated tensor, unused)."""
        return 1 if self.split == ROW else 0

    def shard_shape(self, tp_size: int) -> tuple[int, ...]:
        """The shape of one rank's shard (every rank's is the same)."""
        if self.split == REPLICATED or tp_size == 1:
            return self.shape
        shape = list(self.shape)
        shape[self.dim] = sum(p.units_per_rank(tp_size) * p.size for p in self.parts)
        return tuple(shape)

    def shard_numel(self, tp_size: int) -> int:
        return math.prod(self.shard_shape(tp_size))

    def part_rows(self, rank: int, tp_size: int) -> list[slice]:
        """Rank `rank`'s slice of each part along the split dimension, counted from the part's
        own start (a checkpoint tensor's rows, or columns): one slice per part."""
        return [part.rows(rank, tp_size) for part in self.parts]

    def shard_index(self, rank: int, tp_size: int) -> list[slice]:
        """Rank `rank`'s slices of the whole (fused) tensor along the split dimension: each
        part's slice, offset by where the part starts. [all] for a replicated tensor."""
        if self.split == REPLICATED or tp_size == 1:
            return [slice(0, self.shape[self.dim])]
        index, start = [], 0
        for part, rows in zip(self.parts, self.part_rows(rank, tp_size)):
            index.append(slice(start + rows.start, start + rows.stop))
            start += part.count * part.size
        return index

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
