"""Random attention steps for backend tests: shuffled, non-contiguous block ids, decodes first
and then prefill chunks with prior context, over a block-major 6-D KV arena as the worker has."""

from __future__ import annotations

import numpy as np
import torch

from kunserve.step import BatchLayout

# (query_len, context_len) per sequence, decodes first. Covers: a decode with a single key, a
# decode right at a block boundary, chunks with prior context, a fresh prompt (q == ctx) and a
# one-token-wide window edge case via the window parameter.
MIXED = [(1, 9), (1, 37), (1, 1), (1, 16), (9, 30), (13, 13), (3, 50)]
DECODES_ONLY = [(1, 3), (1, 64), (1, 29), (1, 1), (1, 47)]
PREFILLS_ONLY = [(20, 20), (1, 1), (7, 40), (1, 17), (33, 33)]
CPU = torch.device("cpu")


def random_layout(
    seqs: list[tuple[int, int]], block_size: int, rng: np.random.Generator, spare_blocks: int, pad_columns: int
) -> tuple[BatchLayout, int]:
    """The BatchLayout of (query_len, context_len) sequences over shuffled blocks, with
    `spare_blocks` that no sequence owns and `pad_columns` of zeros in the block tables, and
    the number of blocks."""
    needed = [-(-ctx // block_size) for _, ctx in seqs]
    num_blocks = sum(needed) + spare_blocks
    ids = rng.permutation(num_blocks)
    tables = np.zeros((len(seqs), max(needed) + pad_columns), dtype=np.int64)
    used = 0
    for i, n in enumerate(needed):
        tables[i, :n] = ids[used : used + n]
        used += n
    query_lens = np.array([q for q, _ in seqs], dtype=np.int64)
    slots = []
    for i, (q, ctx) in enumerate(seqs):
        pos = np.arange(ctx - q, ctx)
        slots.append(tables[i, pos // block_size] * block_size + pos % block_size)
    batch = BatchLayout(
        query_lens=query_lens,
        context_lens=np.array([c for _, c in seqs], dtype=np.int64),
        block_tables=tables,
        slot_mapping=np.concatenate(slots),
        # The leading one-token sequences are the decodes; a one-token chunk after a longer
        # one goes through the prefill kernel.
        num_decodes=int(np.argmin(np.append(query_lens, 0) == 1)),
    )
    return batch, num_blocks


def make_step(
    seqs: list[tuple[int, int]],
    *,
    block_size: int = 4,
    num_kv_heads: int = 2,
    group: int = 2,
    head_dim: int = 16,
    num_layers: int = 3,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: torch.device = CPU,
) -> tuple[BatchLayout, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's BatchLayout, a random block-major KV arena [blocks, layers, 2, bs, Hkv, D], and
    the step's q [T, H, D] and new k, v [T, Hkv, D]."""
    batch, num_blocks = random_layout(seqs, block_size, np.random.default_rng(seed), spare_blocks=5, pad_columns=1)
    gen = torch.Generator().manual_seed(seed)
    arena = torch.randn(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, generator=gen)
    tokens = int(batch.query_lens.sum())
    q = torch.randn(tokens, num_kv_heads * group, head_dim, generator=gen)
    k = torch.randn(tokens, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(tokens, num_kv_heads, head_dim, generator=gen)
    return batch, *(t.to(dtype=dtype, device=device) for t in (arena, q, k, v))
