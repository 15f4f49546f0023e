"""One device's memory arena: decoder-layer parameters and KV blocks in a single buffer.

Layer weights are views into their slots and the KV cache is a view of the whole buffer as
a grid of blocks (kunserve/layout.py). Releasing a layer hands its slot to the KV block
allocator without a copy or an allocation; reclaiming takes it back for a weight refill.
The buffer never moves, so kernels and captured graphs keep valid pointers throughout.
"""

from __future__ import annotations

import torch

from kunserve.layout import ArenaLayout
from kunserve.model.decoder import LayerWeights


class MemoryArena:
    def __init__(self, layout: ArenaLayout, dtype: torch.dtype, device: torch.device) -> None:
        self.layout = layout
        # Zeroed, not empty: attention reads whole blocks and masks the unused tail, and
        # masking cannot hide a NaN that uninitialized memory happens to hold.
        self.buffer = torch.zeros(layout.total_elems, dtype=dtype, device=device)
        self.kv_cache = self.buffer.view(
            layout.total_blocks, layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.head_dim
        )
        self.layers = [LayerWeights.view(self._slot(k), layout.params) for k in range(layout.num_layers)]
        self.released: set[int] = set()

    def _slot(self, layer: int) -> torch.Tensor:
        start = self.layout.slot_start_elem(layer)
        return self.buffer[start : start + self.layout.layer_elems]

    def kv_layer(self, layer: int) -> torch.Tensor:
        """[num_blocks, 2, block_size, kv_heads, head_dim] view of one layer's KV."""
        return self.kv_cache[:, layer]

    def stage_kv_cache(self, num_stages: int) -> torch.Tensor:
        """The buffer as sub-blocks of L/g layers each: [total_blocks·g, L/g, 2, block, heads, dim].
        A block's KV for stage r's layers is sub-block b·g + r, in place."""
        layout = self.layout
        layout.check_split(num_stages)
        return self.buffer.view(
            layout.total_blocks * num_stages, layout.num_layers // num_stages, 2, layout.block_size,
            layout.num_kv_heads, layout.head_dim,
        )

    def slot(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s parameter bytes as one flat tensor (to send or receive whole)."""
        return self._slot(layer)

    def release(self, layer: int) -> range:
        """Give up layer `layer`'s weights; returns the block ids its bytes now provide."""
        if layer in self.released:
            raise ValueError(f"layer {layer} is already released")
        self.released.add(layer)
        return self.layout.released_blocks(layer)

    def reclaim(self, layer: int) -> LayerWeights:
        """Take layer `layer`'s slot back; the caller must refill the returned views (the
        caller's block accounting has already checked that its blocks are free)."""
        if layer not in self.released:
            raise ValueError(f"layer {layer} is not released")
        self.released.remove(layer)
        return self.layers[layer]
