"""Paged attention behind a small backend interface.

A backend turns the host-side batch description into device metadata once per step, writes
each layer's new K/V into the paged cache and attends over it. The torch backend here runs
anywhere (CPU in CI); the others plug in behind the same three calls and are chosen by name in
kunserve/kernels/backends.py.

KV cache of one layer: `[num_blocks, 2, block_size, num_kv_heads, head_dim]` (a strided view
of the block-major arena; see kunserve/layout.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from kunserve.step import BatchLayout


class AttentionBackend(ABC):
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    @abstractmethod
    def build_metadata(self, batch: BatchLayout, device: torch.device) -> object:
        """Device-side metadata for one step; shared by every layer of that step."""

    @abstractmethod
    def write_kv(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: object) -> None:
        """Store the new tokens' k/v ([tokens, kv_heads, head_dim]) at their slots."""

    @abstractmethod
    def attend(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: object, sliding_window: int | None) -> torch.Tensor:
        """q: [tokens, heads, head_dim] -> [tokens, heads, head_dim], causal over the paged KV."""

    def decode_graph_buffers(self, max_batch: int, max_blocks: int, device: torch.device) -> DecodeGraphBuffers | None:
        """Static metadata buffers for decode steps replayed from CUDA graphs; None when this
        backend cannot run inside a graph."""
        return None


class DecodeGraphBuffers(ABC):
    """Metadata of decode-only batches in device buffers that never move, so a captured
    graph reads each step's values from the same addresses."""

    @abstractmethod
    def metadata(self, batch_size: int) -> object:
        """Metadata for a padded decode batch of `batch_size` rows, viewing the buffers."""

    @abstractmethod
    def fill(self, batch: BatchLayout) -> None:
        """Copy a decode-only batch into the buffers; rows past it become padding that
        writes no KV and reads one valid block."""


@dataclass
class _PrefillSeq:
    query_start: int
    query_len: int
    context_len: int
    block_ids: torch.Tensor


@dataclass
class TorchAttentionMetadata:
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks]
    decode_context_lens: torch.Tensor  # [num_decodes]
    prefills: list[_PrefillSeq]
    # Key-visibility masks depend only on the step and the window: built once, reused by layers.
    _decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)


class TorchAttentionBackend(AttentionBackend):
    """Reference backend on torch's scaled_dot_product_attention: decodes in one batched call,
    each prefill chunk in its own call (a step holds few of them under the token budget)."""

    def build_metadata(self, batch: BatchLayout, device: torch.device) -> TorchAttentionMetadata:
        block_size = self.block_size
        slots = torch.from_numpy(batch.slot_mapping).to(device)
        nd = batch.num_decodes
        starts = np.concatenate([[0], np.cumsum(batch.query_lens)])
        prefills = []
        for i in range(nd, batch.num_seqs):
            ctx = int(batch.context_lens[i])
            num_blocks = -(-ctx // block_size)
            prefills.append(
                _PrefillSeq(
                    query_start=int(starts[i]),
                    query_len=int(batch.query_lens[i]),
                    context_len=ctx,
                    block_ids=torch.from_numpy(batch.block_tables[i, :num_blocks]).to(device),
                )
            )
        decode_ctx = batch.context_lens[:nd]
        max_decode_blocks = -(-int(decode_ctx.max()) // block_size) if nd else 0
        return TorchAttentionMetadata(
            slot_blocks=slots // block_size,
            slot_offsets=slots % block_size,
            num_decodes=nd,
            decode_block_tables=torch.from_numpy(batch.block_tables[:nd, :max_decode_blocks]).to(device),
            decode_context_lens=torch.from_numpy(decode_ctx).to(device),
            prefills=prefills,
        )

    def write_kv(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: TorchAttentionMetadata) -> None:
        kv_layer[meta.slot_blocks, 0, meta.slot_offsets] = k
        kv_layer[meta.slot_blocks, 1, meta.slot_offsets] = v

    def attend(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: TorchAttentionMetadata, sliding_window: int | None
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._attend_decodes(q[:nd], kv_layer, meta, sliding_window)
        for p in meta.prefills:
            rows = slice(p.query_start, p.query_start + p.query_len)
            out[rows] = self._attend_prefill(q[rows], kv_layer, p, sliding_window)
        return out

    def _attend_decodes(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: TorchAttentionMetadata, window: int | None
    ) -> torch.Tensor:
        tables = meta.decode_block_tables
        b, nb = tables.shape
        _, _, bs, h, d = kv_layer.shape
        # Gather K and V separately (index_select: the fastest gather on CPU) so each arrives contiguous, then fold each GQA group into
        # the query rows of its kv head: no copy of K/V per query head.
        flat = tables.flatten()
        k = kv_layer[:, 0].index_select(0, flat).view(b, nb * bs, h, d).transpose(1, 2)
        v = kv_layer[:, 1].index_select(0, flat).view(b, nb * bs, h, d).transpose(1, 2)
        mask = meta._decode_masks.get(window)
        if mask is None:
            key_pos = torch.arange(nb * bs, device=q.device)[None]
            mask = _visible(key_pos, (meta.decode_context_lens - 1)[:, None], window)[:, None, None, :]
            meta._decode_masks[window] = mask
        q_grouped = q.view(b, h, q.shape[1] // h, d)
        out = F.scaled_dot_product_attention(q_grouped, k, v, attn_mask=mask)
        return out.reshape(q.shape)

    def _attend_prefill(
        self, q: torch.Tensor, kv_layer: torch.Tensor, p: _PrefillSeq, window: int | None
    ) -> torch.Tensor:
        blocks = kv_layer[p.block_ids]  # [nb, 2, bs, H, D]
        nb, _, bs, h, d = blocks.shape
        k = blocks[:, 0].reshape(nb * bs, h, d)[: p.context_len].transpose(0, 1)
        v = blocks[:, 1].reshape(nb * bs, h, d)[: p.context_len].transpose(0, 1)
        # With a batch dimension: 3-D inputs send CPU SDPA to its unfused math path.
        qh, k, v = q.transpose(0, 1)[None], k[None], v[None]
        if p.query_len == p.context_len and (window is None or window >= p.context_len):
            out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, enable_gqa=True)
        else:
            q_pos = torch.arange(p.context_len - p.query_len, p.context_len, device=q.device)[:, None]
            mask = _visible(torch.arange(p.context_len, device=q.device)[None], q_pos, window)
            out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, enable_gqa=True)
        return out[0].transpose(0, 1)


def _visible(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal visibility, limited to the last `window` positions when a window is set."""
    mask = key_pos <= query_pos
    if window is not None:
        mask = mask & (key_pos > query_pos - window)
    return mask

