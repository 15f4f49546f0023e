"""The step message (kunserve/step.py) built from the scheduler's choice of sequences."""

from __future__ import annotations

import itertools

import numpy as np

from kunserve.engine.sequence import Sequence
from kunserve.step import BatchLayout, SamplingBatch, StepInput

# The token id a decode ahead carries until the device puts its sampled input in its place.
_AHEAD_PLACEHOLDER = (0,)


def build_step_input(
    scheduled: list[tuple[Sequence, int]],
    block_size: int,
    finished_request_ids: list[str],
    swap_out: list[tuple[int, int]] | None = None,
    swap_in: list[tuple[int, int]] | None = None,
    ahead_steps_back: int = 1,
) -> StepInput:
    """`scheduled`: (sequence, tokens to compute) with decodes (1 token) first, built before
    the sequences' tokens are marked in flight: each chunk starts after the tokens computed
    or in flight. A decode that starts past a sequence's known tokens runs ahead of the step
    that samples its input (whose sampled row the sequence remembers). Records each sampled
    sequence's row in this step. A step may carry only swaps (no tokens). `ahead_steps_back`:
    how many steps before this one the step that samples those inputs was submitted."""
    seqs = [s for s, _ in scheduled]
    query_lens = np.fromiter((n for _, n in scheduled), dtype=np.int64, count=len(scheduled))
    computed = np.fromiter((s.num_scheduled_tokens for s in seqs), dtype=np.int64, count=len(seqs))
    lengths = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=len(seqs))
    token_ids = np.fromiter(
        itertools.chain.from_iterable(
            s.token_ids[start : start + n] or _AHEAD_PLACEHOLDER
            for start, (s, n) in zip(computed.tolist(), scheduled, strict=True)
        ),
        dtype=np.int64,
        count=int(query_lens.sum()),
    )
    num_tokens = len(token_ids)
    # Position of token j of sequence i = computed[i] + j.
    query_starts = np.cumsum(query_lens) - query_lens
    ahead = np.flatnonzero(computed >= lengths)
    ahead_sample_rows = np.fromiter((seqs[i].sample_row_in_flight for i in ahead), dtype=np.int64, count=len(ahead))
    positions = np.arange(num_tokens, dtype=np.int64) + np.repeat(computed - query_starts, query_lens)
    num_blocks = np.fromiter((len(s.block_ids) for s in seqs), dtype=np.int64, count=len(seqs))
    block_tables = np.zeros((len(seqs), int(num_blocks.max(initial=0))), dtype=np.int64)
    # Row-major fill of each row's prefix, in one scatter instead of a row-by-row copy.
    used = np.arange(block_tables.shape[1]) < num_blocks[:, None]
    block_tables[used] = np.fromiter(
        itertools.chain.from_iterable(s.block_ids for s in seqs), dtype=np.int64, count=int(num_blocks.sum())
    )
    seq_of_token = np.repeat(np.arange(len(seqs)), query_lens)
    slot_mapping = block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    context_lens = computed + query_lens

    samples = np.flatnonzero(context_lens >= lengths)
    for row, i in enumerate(samples.tolist()):
        seqs[i].sample_row_in_flight = row
    rows = np.array([seqs[i].sampling_row for i in samples], dtype=np.float64).reshape(-1, 4)
    sampling = SamplingBatch(
        temperature=rows[:, 0].astype(np.float32),
        top_p=rows[:, 1].astype(np.float32),
        top_k=rows[:, 2].astype(np.int64),
        min_p=rows[:, 3].astype(np.float32),
        seeded=[
            (row, seqs[i].request_id, seqs[i].sampling_params.seed)
            for row, i in enumerate(samples)
            if seqs[i].sampling_params.seed is not None
        ],
    )
    return StepInput(
        token_ids=token_ids,
        positions=positions,
        batch=BatchLayout(
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=block_tables,
            slot_mapping=slot_mapping,
            num_decodes=int(np.count_nonzero(query_lens == 1)),
        ),
        sample_rows=samples,
        sampling=sampling,
        finished_request_ids=finished_request_ids,
        swap_out=_pairs(swap_out),
        swap_in=_pairs(swap_in),
        ahead_token_index=query_starts[ahead],
        ahead_sample_rows=ahead_sample_rows,
        ahead_steps_back=ahead_steps_back,
    )


def _pairs(pairs: list[tuple[int, int]] | None) -> np.ndarray:
    return np.asarray(pairs or [], dtype=np.int64).reshape(-1, 2)
