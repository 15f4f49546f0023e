"""The message the control plane sends to the workers each step.

Everything in it is a host array or a plain value, so one step can be handed to an
in-process worker, pickled to worker processes, or read by a simulator the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class BatchLayout:
    """Host-side shape of one step's batch. Sequences with one query token (decodes) come
    first, then prefill chunks; tokens are laid out in the same order."""

    query_lens: np.ndarray  # [B] int64
    context_lens: np.ndarray  # [B] int64: KV length once this step's tokens are written
    block_tables: np.ndarray  # [B, max_blocks] int64, padded with 0
    slot_mapping: np.ndarray  # [T] int64: block * block_size + offset of each new token
    num_decodes: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


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
    # KV copies before the step computes (kunserve/worker/swap.py): [n, 2] pairs of
    # (device block, host block) to swap out, then (host block, device block) to swap in.
    swap_out: np.ndarray = field(default_factory=lambda: np.empty((0, 2), dtype=np.int64))
    swap_in: np.ndarray = field(default_factory=lambda: np.empty((0, 2), dtype=np.int64))
    # Input tokens of decodes scheduled ahead (kunserve/engine/scheduler.py): their indices in
    # token_ids (which hold a placeholder there), and the rows of the previous step's sampled
    # tokens that the device copies into them.
    ahead_token_index: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    ahead_sample_rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    # How many steps before this one the step that samples those tokens was submitted: 1 on a
    # single device; on a pipeline, the micro-batches in flight when this one was scheduled.
    ahead_steps_back: int = 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decodes_only(self) -> bool:
        """Whether every sequence in it computes one token (no prompt chunk)."""
        return self.num_tokens == len(self.batch.query_lens)
