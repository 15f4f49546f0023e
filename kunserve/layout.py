"""Arena layout: where each decoder layer's parameters and each KV block live on a device.

Pure arithmetic, shared by the control plane (block accounting) and the worker (tensor views),
so that a simulated device and a real one agree on every block id.

The arena is one buffer of `total_blocks * block_elems` elements, seen as a grid of equal
KV blocks. Layer `k`'s parameters occupy a *slot* of `slot_blocks` grid blocks starting at
block `k * slot_blocks`; the KV region follows the last slot. A KV block is block-major: it
holds, for `block_size` tokens, the K and V of every layer the device owns, so one block
table per sequence addresses all layers, and releasing a layer turns the whole grid blocks
inside its slot into KV blocks without moving anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kunserve.model.spec import ModelSpec

# Parameter tensors inside a slot start at multiples of this many bytes, so GEMMs see aligned
# operands (cuBLAS and Triton prefer 128-byte alignment; 256 also suits vectorized loads).
PARAM_ALIGN_BYTES = 256


@dataclass(frozen=True)
class ParamSlice:
    offset: int  # in elements, from the start of the layer's slot
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def layer_param_slices(spec: ModelSpec, elem_bytes: int) -> tuple[dict[str, ParamSlice], int]:
    """The parameters of one decoder layer, packed, and the slot size in elements.

    q/k/v are fused into one `qkv` matrix and gate/up into one `gate_up` matrix, so each
    projection is a single GEMM.
    """
    hidden, inter = spec.hidden_size, spec.intermediate_size
    qkv_rows = spec.q_size + 2 * spec.kv_size
    shapes: dict[str, tuple[int, ...]] = {"input_norm": (hidden,), "qkv": (qkv_rows, hidden)}
    if spec.qkv_bias:
        shapes["qkv_bias"] = (qkv_rows,)
    shapes["o"] = (hidden, spec.q_size)
    if spec.o_bias:
        shapes["o_bias"] = (hidden,)
    shapes["post_attention_norm"] = (hidden,)
    shapes["gate_up"] = (2 * inter, hidden)
    shapes["down"] = (hidden, inter)

    align = max(1, PARAM_ALIGN_BYTES // elem_bytes)
    slices: dict[str, ParamSlice] = {}
    offset = 0
    for name, shape in shapes.items():
        slices[name] = ParamSlice(offset, shape)
        offset = _round_up(offset + math.prod(shape), align)
    return slices, offset


@dataclass(frozen=True)
class ArenaLayout:
    num_layers: int  # decoder layers held on this device (its slots, and its KV per block)
    block_size: int  # tokens per KV block
    num_kv_heads: int
    head_dim: int
    elem_bytes: int
    layer_elems: int
    params: dict[str, ParamSlice]
    total_blocks: int

    @classmethod
    def build(
        cls, spec: ModelSpec, num_layers: int, block_size: int, elem_bytes: int, arena_bytes: int
    ) -> ArenaLayout:
        params, layer_elems = layer_param_slices(spec, elem_bytes)
        layout = cls(
            num_layers=num_layers,
            block_size=block_size,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            elem_bytes=elem_bytes,
            layer_elems=layer_elems,
            params=params,
            total_blocks=arena_bytes // (elem_bytes * cls.kv_block_elems(spec, num_layers, block_size)),
        )
        if layout.num_initial_kv_blocks < 1:
            need = layout.slot_blocks * num_layers + 1
            raise ValueError(
                f"memory budget: the arena needs at least {need * layout.block_bytes} bytes for "
                f"{num_layers} layers plus one KV block, got {arena_bytes}"
            )
        return layout

    @classmethod
    def for_kv_blocks(
        cls, spec: ModelSpec, num_layers: int, block_size: int, elem_bytes: int, num_kv_blocks: int
    ) -> ArenaLayout:
        """The smallest arena holding the layers plus exactly `num_kv_blocks` KV blocks."""
        arena_bytes = cls.bytes_for(spec, num_layers, block_size, elem_bytes, num_kv_blocks)
        return cls.build(spec, num_layers, block_size, elem_bytes, arena_bytes)

    @classmethod
    def bytes_for(cls, spec: ModelSpec, num_layers: int, block_size: int, elem_bytes: int, num_kv_blocks: int) -> int:
        """The bytes of an arena holding the layers plus `num_kv_blocks` KV blocks."""
        block_elems = cls.kv_block_elems(spec, num_layers, block_size)
        _, layer_elems = layer_param_slices(spec, elem_bytes)
        slots = num_layers * math.ceil(layer_elems / block_elems)
        return (slots + num_kv_blocks) * block_elems * elem_bytes

    @staticmethod
    def kv_block_elems(spec: ModelSpec, num_layers: int, block_size: int) -> int:
        return num_layers * 2 * block_size * spec.num_kv_heads * spec.head_dim

    @property
    def block_elems(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim

    @property
    def block_bytes(self) -> int:
        return self.block_elems * self.elem_bytes

    @property
    def layer_bytes(self) -> int:
        return self.layer_elems * self.elem_bytes

    @property
    def slot_blocks(self) -> int:
        return math.ceil(self.layer_elems / self.block_elems)

    @property
    def total_elems(self) -> int:
        return self.total_blocks * self.block_elems

    @property
    def num_initial_kv_blocks(self) -> int:
        return self.total_blocks - self.num_layers * self.slot_blocks

    def initial_kv_blocks(self) -> range:
        return range(self.num_layers * self.slot_blocks, self.total_blocks)

    def swap_blocks(self, swap_space_bytes: int) -> int:
        """Host blocks (each as large as a KV block here) that `swap_space_bytes` holds."""
        return swap_space_bytes // self.block_bytes

    def slot_start_elem(self, layer: int) -> int:
        return layer * self.slot_blocks * self.block_elems

    def released_blocks(self, layer: int) -> range:
        """Grid blocks lying wholly inside layer `layer`'s parameter bytes: floor(layer/block)."""
        first = layer * self.slot_blocks
        return range(first, first + self.layer_elems // self.block_elems)


    # ---- a replica's arena seen as stage r of a g-stage group (block-major split) --------------

    def check_split(self, num_stages: int) -> None:
        if num_stages < 1 or self.num_layers % num_stages:
            raise ValueError(f"num_stages: {num_stages} does not divide the {self.num_layers} layers held")

    def sub_block_elems(self, num_stages: int) -> int:
        """A block split into `num_stages` sub-blocks of num_layers / num_stages layers each:
        sub-block j of block b (id b·g + j) holds the KV of layers [j·L/g, (j+1)·L/g)."""
        self.check_split(num_stages)
        return self.block_elems // num_stages

    def released_sub_blocks(self, layer: int, num_stages: int) -> range:
        """Sub-blocks lying wholly inside layer `layer`'s parameter bytes."""
        first = layer * self.slot_blocks * num_stages
        return range(first, first + self.layer_elems // self.sub_block_elems(num_stages))


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple
