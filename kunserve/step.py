"""The message the control plane sends to the workers each step, and how it is built.

Everything in it is a host array or a plain value, so one step can be handed to an
in-process worker, pickled to worker processes, or read by a simulator the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kunserve.kernels.attention import BatchLayout

if TYPE_CHECKING:
    from kunserve.engine.sequence import Sequence


@dataclass
class SamplingBatch:
    """Sampling settings of the sequences that sample this step, one row each."""

    temperature: np.ndarray  # float32; 0 = greedy
    top_p: np.ndarray  # float32
    top_k: np.ndarray  # int64; 0 = no cut
    min_p: np.ndarray  # float32
    seeded: list[tuple[int, str, int]]  # (row, request id, seed) of seeded requests


@dataclass
class StepInput:
    token_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    batch: BatchLayout
    sample_rows: np.ndarray  # [S] indices of the sequences whose next token is sampled
    sampling: SamplingBatch
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def build_step_input(
    scheduled: list[tuple[Sequence, int]], block_size: int, finished_request_ids: list[str]
) -> StepInput:
    """`scheduled`: (sequence, tokens to compute) with decodes (1 token) first."""
    seqs = [s for s, _ in scheduled]
    query_lens = np.fromiter((n for _, n in scheduled), dtype=np.int64, count=len(scheduled))
    computed = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=len(seqs))
    token_ids: list[int] = []
    for seq, n in scheduled:
        token_ids.extend(seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + n])
    num_tokens = len(token_ids)
    # Position of token j of sequence i = computed[i] + j.
    query_starts = np.cumsum(query_lens) - query_lens
    positions = np.arange(num_tokens, dtype=np.int64) + np.repeat(computed - query_starts, query_lens)
    max_blocks = max(len(s.block_ids) for s in seqs)
    block_tables = np.zeros((len(seqs), max_blocks), dtype=np.int64)
    for i, seq in enumerate(seqs):
        block_tables[i, : len(seq.block_ids)] = seq.block_ids
    seq_of_token = np.repeat(np.arange(len(seqs)), query_lens)
    slot_mapping = block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    context_lens = computed + query_lens

    samples = [i for i, s in enumerate(seqs) if context_lens[i] == len(s.token_ids)]
    params = [seqs[i].sampling_params for i in samples]
    sampling = SamplingBatch(
        temperature=np.array([p.temperature for p in params], dtype=np.float32),
        top_p=np.array([p.top_p for p in params], dtype=np.float32),
        top_k=np.array([max(p.top_k, 0) for p in params], dtype=np.int64),
        min_p=np.array([p.min_p for p in params], dtype=np.float32),
        seeded=[(row, seqs[i].request_id, p.seed) for row, (i, p) in enumerate(zip(samples, params)) if p.seed is not None],
    )
    return StepInput(
        token_ids=np.array(token_ids, dtype=np.int64),
        positions=positions,
        batch=BatchLayout(
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=block_tables,
            slot_mapping=slot_mapping,
            num_decodes=int(np.count_nonzero(query_lens == 1)),
        ),
        sample_rows=np.array(samples, dtype=np.int64),
        sampling=sampling,
        finished_request_ids=finished_request_ids,
    )
