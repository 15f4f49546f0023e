"""Arena layout: where each decoder layer's parameters and each KV block live on a device.

Pure arithmetic, shared by the control plane (block accounting) and the worker (tensor views),
so that a simulated device and a real one agree on every block id.

The arena is one buffer of `total_blocks * block_elems` elements, seen as a grid of equal
KV blocks. Layer `k`'s parameters occupy a *slot* of `slot_blocks` grid blocks starting at
block `k * slot_blocks`; the KV region follows the last slot. A KV block is block-major: it
holds, for `block_size` tokens, the K and V of every layer the device owns, so one block
table per sequence addresses all layers, and releasing a layer turns the whole grid blocks
inside its slot into KV blocks without moving anything.

With tensor parallelism each of a stage's t ranks has its own arena of the same layout: a
slot holds the rank's shard of the layer (kunserve/arch/schema.py says how each tensor
splits) and a KV block the rank's KV heads, so every rank's block ids are the same.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from kunserve.arch.spec import ModelSpec
from kunserve.config import EngineConfig

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


def layer_param_slices(spec: ModelSpec, elem_bytes: int, tp_size: int = 1) -> tuple[dict[str, ParamSlice], int]:
    """The parameters of one decoder layer (its family's schema, kunserve/arch/), packed in
    schema order, and the slot size in elements: one rank's shards of them with `tp_size` ranks."""
    align = max(1, PARAM_ALIGN_BYTES // elem_bytes)
    slices: dict[str, ParamSlice] = {}
    offset = 0
    for tensor in spec.layer_tensors():
        slices[tensor.name] = ParamSlice(offset, tensor.shard_shape(tp_size))
        offset = _round_up(offset + tensor.shard_numel(tp_size), align)
    return slices, offset


@dataclass(frozen=True)
class ArenaLayout:
    num_layers: int  # decoder layers held on this device (its slots, and its KV per block)
    block_size: int  # tokens per KV block
    num_kv_heads: int  # this rank's (all of them without tensor parallelism)
    head_dim: int
    elem_bytes: int
    layer_elems: int
    params: dict[str, ParamSlice]
    total_blocks: int

    @classmethod
    def build(
        cls, spec: ModelSpec, num_layers: int, block_size: int, elem_bytes: int, arena_bytes: int, tp_size: int = 1
    ) -> ArenaLayout:
        """One rank's arena of `arena_bytes` (of `tp_size` ranks splitting the layers)."""
        params, layer_elems = layer_param_slices(spec, elem_bytes, tp_size)
        layout = cls(
            num_layers=num_layers,
            block_size=block_size,
            num_kv_heads=spec.kv_heads_per_rank(tp_size),
            head_dim=spec.head_dim,
            elem_bytes=elem_bytes,
            layer_elems=layer_elems,
            params=params,
            total_blocks=arena_bytes // (elem_bytes * cls.kv_block_elems(spec, num_layers, block_size, tp_size)),
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
        cls, spec: ModelSpec, num_layers: int, block_size: int, elem_bytes: int, num_kv_blocks: int, tp_size: int = 1
    ) -> ArenaLayout:
        """The smallest arena holding the layers plus exactly `num_kv_blocks` KV blocks."""
        arena_bytes = cls.bytes_for(spec, num_layers, block_size, elem_bytes, num_kv_blocks, tp_size)
        return cls.build(spec, num_layers, block_size, elem_bytes, arena_bytes, tp_size)

    @classmethod
    def bytes_for(cls, spec: ModelSpec, num_layers: int, block_size: int, elem_bytes: int, num_kv_blocks: int,
                  tp_size: int = 1) -> int:
        """The bytes of a rank's arena holding its shard of the layers plus `num_kv_blocks` KV blocks."""
        block_elems = cls.kv_block_elems(spec, num_layers, block_size, tp_size)
        _, layer_elems = layer_param_slices(spec, elem_bytes, tp_size)
        slots = num_layers * math.ceil(layer_elems / block_elems)
        return (slots + num_kv_blocks) * block_elems * elem_bytes

    @staticmethod
    def kv_block_elems(spec: ModelSpec, num_layers: int, block_size: int, tp_size: int = 1) -> int:
        return num_layers * 2 * block_size * spec.kv_heads_per_rank(tp_size) * spec.head_dim

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
        check_divides(self.num_layers, num_stages)

    def sub_block_elems(self, num_stages: int) -> int:
        """A block split into `num_stages` sub-blocks of num_layers / num_stages layers each:
        sub-block j of block b (id b·g + j) holds the KV of layers [j·L/g, (j+1)·L/g)."""
        self.check_split(num_stages)
        return self.block_elems // num_stages

    def released_sub_blocks(self, layer: int, num_stages: int) -> range:
        """Sub-blocks lying wholly inside layer `layer`'s parameter bytes."""
        first = layer * self.slot_blocks * num_stages
        return range(first, first + self.layer_elems // self.sub_block_elems(num_stages))

    def released_sub_blocks_of_stage(self, stage: int, num_stages: int) -> list[int]:
        """The sub-blocks a replica's arena gains when it becomes stage `stage` of a
        `num_stages`-stage group: those inside every layer it releases."""
        return [i for layer in layers_outside_stage(self.num_layers, stage, num_stages)
                for i in self.released_sub_blocks(layer, num_stages)]


# ---- an engine's arena: what its budget leaves for KV ------------------------------------

# Scratch memory a step may take beyond the arena, per batched token: the widest
# activations of one layer (residual, normed input, qkv, attention output, gate_up, the
# SiLU product) with room for the allocator's rounding.
ACTIVATION_SAFETY_FACTOR = 2
# Logits are float32 and the sampler holds a few vocab-wide copies of them per sampled row.
SAMPLER_LOGIT_COPIES = 4


def arena_layout(
    spec: ModelSpec, config: EngineConfig, layer_range: tuple[int, int], elem_bytes: int, budget_bytes: int | None
) -> ArenaLayout:
    """The arena of a device (one rank of `config.tensor_parallel_size`) holding `layer_range`:
    exactly `num_kv_blocks` KV blocks when set, else what `budget_bytes` leaves after the
    stage's other weights and a step's scratch memory (None: `cpu_kv_cache_bytes` of KV).
    Simulated devices use it too."""
    start, end = layer_range
    num_layers = end - start
    t = config.tensor_parallel_size
    if config.num_kv_blocks is not None:
        return ArenaLayout.for_kv_blocks(spec, num_layers, config.block_size, elem_bytes, config.num_kv_blocks, t)
    _, layer_elems = layer_param_slices(spec, elem_bytes, t)
    if budget_bytes is None:
        arena_bytes = num_layers * layer_elems * elem_bytes + config.cpu_kv_cache_bytes
    else:
        first, last = start == 0, end == spec.num_layers
        vocab_rows = (first + (last and not (first and spec.tie_word_embeddings))) * spec.vocab_per_rank(t)
        stage_bytes = (vocab_rows + last) * spec.hidden_size * elem_bytes
        sharded = (spec.heads_per_rank(t) + 2 * spec.kv_heads_per_rank(t)) * spec.head_dim + 3 * spec.intermediate_size // t
        widest = 3 * spec.hidden_size + sharded
        activations = ACTIVATION_SAFETY_FACTOR * config.max_num_batched_tokens * widest * elem_bytes
        logits = SAMPLER_LOGIT_COPIES * config.max_num_seqs * spec.vocab_size * 4
        arena_bytes = budget_bytes - stage_bytes - activations - logits
        least = ArenaLayout.bytes_for(spec, num_layers, config.block_size, elem_bytes, 1, t)
        if arena_bytes < least:
            raise ValueError(
                f"memory budget: {format_size(budget_bytes)} leaves {format_size(arena_bytes)} for the arena of "
                f"{num_layers} layers, which needs {format_size(least)} for them and one KV block; the rest goes to "
                f"the embeddings and LM head ({format_size(stage_bytes)}), activations of max_num_batched_tokens="
                f"{config.max_num_batched_tokens} ({format_size(activations)}) and the sampler's logits for "
                f"max_num_seqs={config.max_num_seqs} ({format_size(logits)})"
            )
    return ArenaLayout.build(spec, num_layers, config.block_size, elem_bytes, arena_bytes, t)


def format_size(num_bytes: float) -> str:
    """Bytes in the unit a reader takes in at once (negative budgets included)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes:.0f} bytes"


# ---- pipeline stages and sub-blocks: the arithmetic every layer above shares -----------------


def stage_ranges(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Stage r's layers [r·L/g, (r+1)·L/g), floored: uneven when g does not divide L (a static
    pipeline may be uneven; a drop's group needs g to divide L: `check_divides`)."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"pipeline_parallel_size: must be in [1, {num_layers}] (the layers), got {num_stages}")
    bounds = [r * num_layers // num_stages for r in range(num_stages + 1)]
    return list(itertools.pairwise(bounds))


def stage_layers(num_layers: int, stage: int, num_stages: int) -> range:
    """The layers stage `stage` of a `num_stages`-stage pipeline holds."""
    return range(*stage_ranges(num_layers, num_stages)[stage])


def layers_outside_stage(num_layers: int, stage: int, num_stages: int) -> list[int]:
    """The layers a replica releases when it becomes stage `stage` of a drop's group."""
    keep = stage_layers(num_layers, stage, num_stages)
    return [layer for layer in range(num_layers) if layer not in keep]


def check_divides(num_layers: int, num_stages: int) -> None:
    """A drop's group of `num_stages` replicas needs equal stages: g must divide L."""
    if num_stages < 1 or num_layers % num_stages:
        raise ValueError(f"num_stages: {num_stages} does not divide the {num_layers} layers held")


def sub_block_id(block: int, num_stages: int, stage: int) -> int:
    """Sub-block `stage` of block `block` split into `num_stages`: the KV of layers
    [stage·L/g, (stage+1)·L/g) for that block's tokens, in place."""
    return block * num_stages + stage


def sub_block_ids(blocks: np.ndarray | list[int], num_stages: int, stage: int | None = None) -> np.ndarray:
    """`sub_block_id` of many blocks: with `stage`, that stage's sub-block of each block; else
    every sub-block, block by block (b·g + 0, ..., b·g + g-1)."""
    blocks = np.asarray(blocks, dtype=np.int64)
    if stage is not None:
        return blocks * num_stages + stage
    return (blocks[:, None] * num_stages + np.arange(num_stages)).ravel()


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple
