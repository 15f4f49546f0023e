"""Decode attention on CPU, compiled by TorchInductor to read the paged KV in place.

The torch reference gathers every decode's KV blocks into a contiguous copy and hands it to
scaled_dot_product_attention. On CPU the copy and SDPA's kernel (tuned for long queries, not a
decode's one row per head) cost several times the attention itself. Written as broadcast
products and reductions, the attention compiles into loops that read each block through the
block table, K once and V once, as vLLM's CPU paged-attention kernel does. Prefill chunks keep
the reference path: SDPA is efficient for their long queries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from kunserve.kernels.attention import TorchAttentionBackend, TorchAttentionMetadata

logger = logging.getLogger(__name__)


def paged_decode_attention(
    q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """q [B, heads, D] of one new token per sequence -> [B, heads, D], over the first
    `context_lens` keys of each sequence's blocks (the last `window` of them when set)."""
    b, num_blocks = block_tables.shape
    _, _, block_size, kv_heads, head_dim = kv_layer.shape
    keys = kv_layer[block_tables, 0].view(b, num_blocks * block_size, kv_heads, 1, head_dim)
    values = kv_layer[block_tables, 1].view(b, num_blocks * block_size, kv_heads, 1, head_dim)
    # Each kv head's query heads (its GQA group) share one read of its keys and values.
    grouped = q.view(b, 1, kv_heads, -1, head_dim).float()
    scores = (grouped * keys.float()).sum(-1) * head_dim**-0.5  # [B, keys, kv_heads, group]
    key_pos = torch.arange(num_blocks * block_size, device=q.device)[None]
    query_pos = (context_lens - 1)[:, None]
    hidden = key_pos > query_pos
    if window is not None:
        hidden = hidden | (key_pos <= query_pos - window)
    probs = scores.masked_fill(hidden[:, :, None, None], float("-inf")).softmax(1)
    out = (probs[..., None] * values.float()).sum(1)  # [B, kv_heads, group, D]
    return out.view(q.shape).to(q.dtype)


class InductorAttentionBackend(TorchAttentionBackend):
    """The torch reference with decodes in one compiled call. Falls back to the reference, with
    a warning, where the first compilation fails (a machine without a C++ compiler)."""

    def __init__(self, block_size: int) -> None:
        super().__init__(block_size)
        self._decode: Callable[..., torch.Tensor] | None = torch.compile(
            paged_decode_attention, options={"compile_threads": 1}  # no pool of compile processes to start
        )
        self._compiled_once = False

    def _attend_decodes(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: TorchAttentionMetadata, window: int | None
    ) -> torch.Tensor:
        if self._decode is None:
            return super()._attend_decodes(q, kv_layer, meta, window)
        tables, lens = meta.decode_block_tables, meta.decode_context_lens
        # Batch size and block count change every step: compile them as symbols from the start,
        # the model's dimensions as constants.
        for tensor, dim in ((q, 0), (tables, 0), (tables, 1), (lens, 0)):
            torch._dynamo.maybe_mark_dynamic(tensor, dim)
        try:
            out = self._decode(q, kv_layer, tables, lens, window)
        except Exception as error:
            if self._compiled_once:
                raise
            logger.warning("compiled CPU decode attention unavailable (%s); using the torch reference", error)
            self._decode = None
            return super()._attend_decodes(q, kv_layer, meta, window)
        self._compiled_once = True
        return out
