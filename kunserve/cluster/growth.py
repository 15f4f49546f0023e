"""Growing a pipeline group: each stage of a g-stage group splits into k, with k-1 units of
g joining (g replicas, or another g-stage group), so that the group becomes k·g stages and
its members free more of their weights as KV memory (2 -> 4 -> 8 as a burst outlasts what a
pair adds).

Stage r of the g-stage group holds layers [r·L/g, (r+1)·L/g). It becomes stage k·r of the
grown group and keeps the first k-th of those layers, releasing the rest (their bytes join
its KV pool at once); its j-th partner becomes stage k·r + j, keeping the j-th k-th and
releasing every other layer, as a drop does; where the partners are another group, its
stage r keeps the j-th k-th of the same layers. Sub-block p of a g-stage device (the KV of
its L/g layers for one block's tokens) is, seen as a (k·g)-stage device sees it, sub-blocks
k·p .. k·p + k-1, each one new stage's layers, in place (kunserve/layout.py: a sub-block is
layer-major). So a group's running requests keep the sub-block of their device's new stage
where it is and send the others to their new stages; a joining replica's running requests
keep their new stage's sub-block of each block and send the rest, as in a drop. The exchange runs in rounds, each source
freeing what it sent (kunserve/cluster/transitions.py). No request is recomputed; every
queued request moves to the grown group's queue.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque

import numpy as np

from kunserve.cluster.links import replica_device
from kunserve.cluster.transitions import Transfers, TransitionStats, _exchange, _move_sampler_states
from kunserve.engine.block_manager import BlockManager
from kunserve.engine.llm_engine import LLMEngine
from kunserve.engine.sequence import Sequence
from kunserve.engine.staged_block_manager import StagedBlockManager
from kunserve.executor.base import FusedGroupExecutor, WorkerExecutor
from kunserve.layout import sub_block_ids
from kunserve.outputs import RequestOutput
from kunserve.worker.protocol import DeviceCalls

logger = logging.getLogger(__name__)

# Where one running request's KV for one stage of the grown group lies now: the device (its
# index among the grown group's stages) and the sub-block ids there, one per block.
Source = tuple[int, np.ndarray]


def grow(groups: list[LLMEngine], stages: list[LLMEngine]) -> tuple[LLMEngine, list[RequestOutput], TransitionStats]:
    """The group grown from `groups` (g stages each) and the replicas joining them, k units of
    g stages in all: `stages` are the replicas' own engines in the grown group's stage order,
    stage k·r + u being unit u's r-th; a unit is one of `groups` (its member r at stage
    k·r + u; the first group is unit 0) or g replicas in replica mode, nothing in flight.
    Returns the grown group's engine and the outputs of the groups' steps that were still in
    flight (the caller delivers them)."""
    clock = groups[0].clock
    start = clock()
    executors = [replica_device(engine.executor, "grow") for engine in stages]
    size = len(stages)
    units = _units(groups, executors)
    g = size // len(units)
    k = len(units)
    outputs = [out for group in groups for out in group.drain()]
    ranks = [e.global_ranks[0] for e in executors]
    becoming = [e.post(0, DeviceCalls.become_stage, s, size, ranks[s - 1] if s else None,
                       ranks[s + 1] if s < size - 1 else None)
                for s, e in enumerate(executors)]  # all devices at once
    released = [pending.wait() for pending in becoming]
    last = size - 1  # the last stage samples for the group
    pools = [BlockManager(stages[0].config.block_size,
                          sub_block_ids(np.fromiter(engine.block_manager.pool, dtype=np.int64), size).tolist()
                          + released[s])
             for s, engine in enumerate(stages)]
    handed: list[tuple[LLMEngine, list[Sequence], list[Sequence]]] = []  # (engine, running, waiting)
    sources: list[list[Source]] = []  # per running request, in handed order
    for u, group in enumerate(units):
        if group is not None:  # stage t's KV lies in sub-block k·p + t % k of the unit's stage t // k
            running, waiting = group.hand_over()
            blocks = group.block_manager
            assert isinstance(blocks, StagedBlockManager)
            _move_sampler_states(executors, k * (g - 1) + u, last, [seq.request_id for seq in running + waiting])
            handed.append((group, running, waiting))
            for seq in running:
                old = blocks.physical[:, seq.block_ids]
                sources.append([(k * (t // k) + u, k * old[t // k] + t % k) for t in range(size)])
            continue
        for s in range(u, size, k):  # a replica: stage t's KV lies in sub-block b·size + t of its blocks b
            running, waiting = stages[s].hand_over()
            if s != last:
                _move_sampler_states(executors, s, last, [seq.request_id for seq in running + waiting])
            handed.append((stages[s], running, waiting))
            sources += [[(s, sub_block_ids(seq.block_ids, size, t)) for t in range(size)] for seq in running]
    for per_stage in sources:
        for device, ids in per_stage:
            pools[device].claim(ids.tolist())
    blocks = StagedBlockManager(stages[0].config.block_size, pools)
    exchange_start = clock()
    physical, moved, rounds = _exchange_in_rounds(executors, pools, sources)
    exchange_s = clock() - exchange_start
    for seq, rows in zip((seq for _, running, _ in handed for seq in running), physical):
        seq.block_ids = blocks.bind(rows.tolist())
    config = dataclasses.replace(groups[0].config, pipeline_parallel_size=size,
                                 max_num_seqs=sum(engine.config.max_num_seqs for engine, _, _ in handed))
    grown = LLMEngine.for_group(groups[0], config, executors[0].form_group(executors, blocks), blocks)
    for engine, running, waiting in handed:
        grown.take_over(engine, running, waiting)
    grown.scheduler.running.sort(key=lambda seq: seq.age_key)
    grown.scheduler.waiting = deque(sorted(grown.scheduler.waiting, key=lambda seq: seq.arrival_order))
    stats = TransitionStats(clock() - start, exchange_s, moved, exchange_rounds=rounds)
    logger.info("grew %d unit(s) of %d stages into a %d-stage group in %.1f ms (KV exchange %.1f ms in %d rounds): "
                "%d running requests, %d sub-blocks", k, g, size, stats.duration_s * 1e3, exchange_s * 1e3, rounds,
                len(grown.scheduler.running), moved)
    return grown, outputs, stats


def _units(groups: list[LLMEngine], executors: list[WorkerExecutor]) -> list[LLMEngine | None]:
    """Which of `groups` each unit of the grown group is (None: replicas joining): unit u is
    the group whose members are the devices of stages u, u + k, u + 2k, ...; the first group
    is unit 0. ValueError when the stages do not line up so."""
    first = groups[0].executor
    if not isinstance(first, FusedGroupExecutor):
        raise TypeError("grow: not a group made by a drop")
    g, size = len(first.members), len(executors)
    k = size // g
    if size % g or k < 2:
        raise ValueError(f"stages: {size} stages are no multiple k >= 2 of the group's {g}")
    units: list[LLMEngine | None] = [None] * k
    for group in groups:
        executor = group.executor
        u = next((u for u in range(k) if isinstance(executor, FusedGroupExecutor)
                  and executor.members == executors[u::k] and isinstance(group.block_manager, StagedBlockManager)),
                 None)
        if u is None or units[u] is not None:
            raise ValueError("stages: each group's members must be every k-th stage, from a unit's first")
        units[u] = group
    if units[0] is not groups[0]:
        raise ValueError("stages: the first group's members must be stages 0, k, 2k, ...")
    return units


def _exchange_in_rounds(
    executors: list[WorkerExecutor], pools: list[BlockManager], sources: list[list[Source]]
) -> tuple[list[np.ndarray], int, int]:
    """Move every running request's KV to its stages: per request, per stage t, from where it
    lies (`sources`) into free sub-blocks of stage t, unless it lies there already. A stage
    receives into its free sub-blocks, which its claimed ones leave few of at first; so the
    exchange runs in rounds, each source freeing what it sent. Returns each request's
    [stage, block] physical sub-blocks, the sub-blocks moved and the rounds taken."""
    size = len(pools)
    physical = [np.empty((size, len(per_stage[0][1])), dtype=np.int64) for per_stage in sources]
    pending: dict[int, list[tuple[int, int, int, int]]] = {t: [] for t in range(size)}  # (request, block, src, id)
    for i, per_stage in enumerate(sources):
        for t, (device, ids) in enumerate(per_stage):
            if device == t:
                physical[i][t] = ids
            else:
                pending[t].extend((i, b, device, int(ids[b])) for b in range(len(ids)))
    moved = rounds = 0
    while any(pending.values()):
        rounds += 1
        transfers: Transfers = {}
        sent: list[list[int]] = [[] for _ in range(size)]
        for t in range(size):
            count = min(len(pending[t]), pools[t].num_free_blocks)
            batch, pending[t] = pending[t][:count], pending[t][count:]
            for (i, b, device, source), target in zip(batch, pools[t].take(count)):
                physical[i][t, b] = target
                sources_of, targets_of = transfers.setdefault((device, t), ([], []))
                sources_of.append(source)
                targets_of.append(target)
                sent[device].append(source)
        if not transfers:
            raise RuntimeError("grow: no stage has a free sub-block to receive KV into")
        moved += _exchange(executors, transfers)
        for device, ids in enumerate(sent):
            pools[device].give(ids)
    return physical, moved, rounds
