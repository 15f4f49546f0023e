"""A drop's KV exchange: where each running request's other-stage KV goes, in rounds, and
the overlapped exchange that moves it in chunks between the group's steps.

A request that was running on member h keeps its stage-h KV in place (sub-block b·g + h of
each of its blocks b); every other stage r receives sub-block b·g + r. A drop comes when
memory is full, so a stage has at first only its released layers' sub-blocks to receive
into: the exchange runs in rounds, each source freeing the sub-blocks it sent for the next
round (with equal members it always completes: stage r ends up holding one sub-block per
logical block in use, and its g·B + released sub-blocks hold more than the members' B
blocks each). `plan_rounds` works this out on the group's block pools without touching a
device; kunserve/cluster/transitions.py either runs the rounds inside the drop, or hands an
`OverlappedExchange` to the group engine, which runs one chunk before each step.

Overlapped, the group starts at once: queued requests are admitted into the free sub-blocks
(the released layers' memory less what the exchange will write), and a running request is
parked until the last of its sub-blocks has arrived, then decodes in the group. Nothing a
step writes can meet a transfer: the sub-blocks a transfer reads stay claimed until it has
run, the ones it writes are bound to parked requests, and one chunk runs at a time, each
after the previous one completed (a round's sources are the next round's targets).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kunserve.cluster.links import post_kv_copy
from kunserve.engine.scheduler import Scheduler
from kunserve.engine.sequence import Sequence
from kunserve.engine.staged_block_manager import StagedBlockManager
from kunserve.executor.base import Pending, WorkerExecutor
from kunserve.layout import ArenaLayout, sub_block_id, sub_block_ids

logger = logging.getLogger(__name__)

Transfers = dict[tuple[int, int], tuple[list[int], list[int]]]  # (src stage, dst stage) -> (src ids, dst ids)


@dataclass
class Move:
    """One sub-block of request `seq_index` going from stage `src` to stage `dst`."""

    seq_index: int
    src: int
    dst: int
    source: int
    target: int


@dataclass
class ExchangePlan:
    rounds: list[list[Move]]  # in order: a round's targets may be an earlier round's sources
    physical: list[np.ndarray]  # per request: [stage, its k-th block] -> physical sub-block

    @property
    def num_moved(self) -> int:
        return sum(len(moves) for moves in self.rounds)


def plan_rounds(blocks: StagedBlockManager, seqs: list[Sequence], homes: list[int]) -> ExchangePlan:
    """The exchange's rounds, taking each round's targets from the stages' pools and giving its
    sources back for the next (bookkeeping only: no device is touched)."""
    stages = blocks.stages
    g = len(stages)
    physical = [np.empty((g, len(seq.block_ids)), dtype=np.int64) for seq in seqs]
    for seq, home, rows in zip(seqs, homes, physical):
        rows[home] = sub_block_ids(seq.block_ids, g, home)
    pending = {r: [(i, k) for i, (seq, home) in enumerate(zip(seqs, homes)) if home != r
                   for k in range(len(seq.block_ids))] for r in range(g)}
    rounds: list[list[Move]] = []
    while any(pending.values()):
        moves: list[Move] = []
        for r in range(g):
            count = min(len(pending[r]), stages[r].num_free_blocks)
            batch, pending[r] = pending[r][:count], pending[r][count:]
            for (i, k), target in zip(batch, stages[r].take(count)):
                physical[i][r, k] = target
                moves.append(Move(i, homes[i], r, sub_block_id(seqs[i].block_ids[k], g, r), target))
        if not moves:
            raise RuntimeError("fuse: no stage has a free sub-block to receive KV into")
        for move in moves:  # sent away: free for the next round
            stages[move.src].give([move.source])
        rounds.append(moves)
    return ExchangePlan(rounds, physical)


def transfers_of(moves: list[Move]) -> Transfers:
    transfers: Transfers = {}
    for move in moves:
        sources, targets = transfers.setdefault((move.src, move.dst), ([], []))
        sources.append(move.source)
        targets.append(move.target)
    return transfers


def post_transfers(executors: list[WorkerExecutor], transfers: Transfers) -> list[Pending[None]]:
    """Start the KV transfers, all devices at once, each pair by its path (kunserve/cluster/
    links.py: a pull from the source's arena on one host, a send and a receive across two)."""
    posted: list[Pending[None]] = []
    for (src, dst), (sources, targets) in sorted(transfers.items()):
        if sources:
            posted += post_kv_copy(executors[src], executors[dst], sources, targets)
    return posted


@dataclass
class _Chunk:
    moves: list[Move]
    release: list[tuple[int, int]] = field(default_factory=list)  # (stage, sub-block) free once run


class OverlappedExchange:
    """The exchange run a chunk at a time between a group's steps (the engine's BetweenSteps):
    each `advance` completes the chunk posted before (its sources go free, requests whose KV
    is all there run again) and posts the next one, so a chunk's copies overlap the step."""

    def __init__(self, executors: list[WorkerExecutor], blocks: StagedBlockManager, scheduler: Scheduler,
                 seqs: list[Sequence], plan: ExchangePlan, chunk_sub_blocks: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if chunk_sub_blocks < 1:
            raise ValueError(f"exchange chunk: must be >= 1 sub-blocks, got {chunk_sub_blocks}")
        self.executors, self.blocks, self.scheduler, self.seqs = executors, blocks, scheduler, seqs
        self.clock = clock
        self.started_at = clock()
        self.finished_at: float | None = None
        self.chunks = _chunks(plan, chunk_sub_blocks)
        self._hold_sources(plan)
        self._left = [0] * len(seqs)  # sub-blocks still to arrive, per request
        for move in (m for moves in plan.rounds for m in moves):
            self._left[move.seq_index] += 1
        self._posted: tuple[_Chunk, list[Pending[None]]] | None = None
        self.num_unparked = 0
        for i, left in enumerate(self._left):
            if left == 0:
                self._arrived(i)

    def _hold_sources(self, plan: ExchangePlan) -> None:
        """Planning gave every source back; claim again those no later round writes, until the
        chunk that reads them has run (a step might otherwise write them first)."""
        stages = self.blocks.stages
        by_move = {id(m): c for c in self.chunks for m in c.moves}
        for moves in plan.rounds:
            for move in moves:
                if stages[move.src].is_free(move.source):
                    stages[move.src].claim([move.source])
                    by_move[id(move)].release.append((move.src, move.source))

    @property
    def done(self) -> bool:
        return self._posted is None and not self.chunks

    def advance(self) -> bool:
        self._complete_posted()
        if self.chunks:
            chunk = self.chunks.pop(0)
            self._posted = (chunk, post_transfers(self.executors, transfers_of(chunk.moves)))
        elif self.finished_at is None:
            self.finished_at = self.clock()
            logger.info("overlapped KV exchange done in %.1f ms", (self.finished_at - self.started_at) * 1e3)
        return self.done

    def _complete_posted(self) -> None:
        if self._posted is None:
            return
        chunk, pending = self._posted
        self._posted = None
        for p in pending:
            p.wait()
        for stage, sub_block in chunk.release:
            self.blocks.stages[stage].give([sub_block])
        for move in chunk.moves:
            self._left[move.seq_index] -= 1
            if self._left[move.seq_index] == 0:
                self._arrived(move.seq_index)

    def _arrived(self, i: int) -> None:
        self.num_unparked += self.scheduler.unpark(self.seqs[i])


def _chunks(plan: ExchangePlan, size: int) -> list[_Chunk]:
    """Each round cut into chunks of at most `size` sub-blocks (a chunk never spans rounds)."""
    return [_Chunk(moves[start:start + size]) for moves in plan.rounds for start in range(0, len(moves), size)]


def layer_sized_chunk(layout: ArenaLayout, num_stages: int) -> int:
    """Sub-blocks of a `num_stages` group whose bytes make one layer's slot: the chunk a step
    waits behind at most."""
    return max(1, layout.layer_elems // layout.sub_block_elems(num_stages))


def ordered_for_overlap(seqs: list[Sequence], homes: list[int]) -> tuple[list[Sequence], list[int]]:
    """The requests with the fewest blocks first: the most of them run again soonest."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i].block_ids), seqs[i].age_key))
    return [seqs[i] for i in order], [homes[i] for i in order]
