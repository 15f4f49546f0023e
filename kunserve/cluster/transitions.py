"""Drop and restore for a set of replicas: `fuse` turns g replica engines into one g-stage
pipeline group engine, `split` turns it back. Each runs between steps, synchronously, on
the engines' worker processes (kunserve/worker/drop.py does the device side).

fuse: stage r keeps layers [r·L/g, (r+1)·L/g) and releases the rest; the freed bytes join
its sub-block pool at once. A request that was running on replica h keeps its stage-h KV in
place (sub-block b·g + h of each of its blocks) and sends the other stages' sub-blocks to
their devices (the KV exchange: one batched transfer per device pair); no request is
recomputed. Queued and running requests of all members move to the group's scheduler.

split: KV lying in a dropped layer's memory is moved out; each running request gets a home
replica, where every stage's sub-blocks of each of its blocks are gathered into one full
block; the dropped weights are copied back from the stages that kept them; each replica
takes its requests (and a share of the queue) back. Devices copy from each other's arenas
directly (mapped once, before the first drop: CUDA IPC, or shared memory on CPU); devices on
two hosts send and receive over torch.distributed instead (kunserve/cluster/links.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from kunserve.cluster.exchange import (
    OverlappedExchange,
    Transfers,
    ordered_for_overlap,
    plan_rounds,
    post_transfers,
    transfers_of,
)
from kunserve.cluster.links import replica_device, share_host
from kunserve.engine.block_manager import BlockManager
from kunserve.engine.llm_engine import LLMEngine
from kunserve.engine.sequence import Sequence
from kunserve.engine.staged_block_manager import StagedBlockManager
from kunserve.engine.stats import group_stats_listener
from kunserve.executor.base import FusedGroupExecutor, WorkerExecutor
from kunserve.layout import stage_layers, sub_block_ids
from kunserve.outputs import RequestOutput
from kunserve.worker.protocol import DeviceCalls

logger = logging.getLogger(__name__)

@dataclass
class TransitionStats:
    duration_s: float  # decision to blocks usable (fuse) / to replicas running again (split)
    exchange_s: float  # of that, moving KV between devices
    sub_blocks_moved: int
    weights_s: float = 0.0  # of a split: refilling the dropped weights from the peers
    exchange_rounds: int = 1  # a drop into a full cache exchanges in rounds (see kunserve/cluster/exchange.py)


class SplitRefused(RuntimeError):
    """A restore that cannot be done now (too few free blocks to gather the requests' KV at
    their homes): the group serves on as it was. `outputs`: the steps drained before."""

    def __init__(self, message: str, outputs: list[RequestOutput] | None = None) -> None:
        super().__init__(message)
        self.outputs = outputs or []


def pipe_back(ranks: list[int], stage: int) -> int | None:
    """The other end of the group's pipeline, for its first and last stages (see become_stage)."""
    if stage == 0:
        return ranks[-1]
    return ranks[0] if stage == len(ranks) - 1 else None


def fuse(members: list[LLMEngine], overlap_chunk: int | None = None) -> tuple[LLMEngine, TransitionStats]:
    """The group engine of `members` (their steps must all be collected). `overlap_chunk`:
    None, the KV exchange completes inside the drop; else the group starts at once and moves
    the KV in chunks of this many sub-blocks between its steps, each running request parked
    until its KV has arrived (kunserve/cluster/exchange.py)."""
    clock = members[0].clock
    start = clock()
    g = len(members)
    executors = [replica_device(m.executor, "fuse") for m in members]
    ranks = [e.global_ranks[0] for e in executors]
    block_size = members[0].config.block_size
    becoming = [e.post(0, DeviceCalls.become_stage, r, g, ranks[r - 1] if r else None,
                       ranks[r + 1] if r < g - 1 else None, back_rank=pipe_back(ranks, r))
                for r, e in enumerate(executors)]  # all members at once
    released = [pending.wait() for pending in becoming]
    handed = [m.hand_over() for m in members]
    for h, (running, waiting) in enumerate(handed[:-1]):  # the last stage samples for the group
        _move_sampler_states(executors, h, g - 1, [s.request_id for s in running + waiting])
    # Per member: the full blocks its running requests hold.
    homed = [np.asarray([b for s in running for b in s.block_ids], dtype=np.int64) for running, _ in handed]
    stages = []
    for r, member in enumerate(members):
        pool = np.fromiter(member.block_manager.pool, dtype=np.int64)
        stage = BlockManager(block_size, sub_block_ids(pool, g).tolist() + released[r])
        stage.claim(sub_block_ids(homed[r], g).tolist())
        stages.append(stage)
    blocks = StagedBlockManager(block_size, stages)
    exchange_start = clock()
    seqs = [seq for running, _ in handed for seq in running]
    homes = [h for h, (run, _) in enumerate(handed) for _ in run]
    if overlap_chunk is not None:
        seqs, homes = ordered_for_overlap(seqs, homes)
    plan = plan_rounds(blocks, seqs, homes)
    for seq, rows in zip(seqs, plan.physical):
        seq.block_ids = blocks.bind(rows.tolist())
    if overlap_chunk is None:
        for moves in plan.rounds:
            _exchange(executors, transfers_of(moves))
    moved, rounds = plan.num_moved, len(plan.rounds)
    exchange_s = clock() - exchange_start
    # The group runs what its members ran: their sequence slots add up.
    config = dataclasses.replace(members[0].config, max_num_seqs=sum(m.config.max_num_seqs for m in members),
                                 pipeline_parallel_size=g)
    group = LLMEngine.for_group(members[0], config, executors[0].form_group(executors, blocks), blocks)
    group.stats_listener = group_stats_listener([member.stats_listener for member in members])
    for member, (running, waiting) in zip(members, handed):
        group.take_over(member, running, waiting)
    group.scheduler.running.sort(key=lambda s: s.age_key)
    group.scheduler.waiting = deque(sorted(group.scheduler.waiting, key=lambda s: s.arrival_order))
    if overlap_chunk is not None:
        group.scheduler.park(seqs)
        group.between_steps = OverlappedExchange(executors, blocks, group.scheduler, seqs, plan, overlap_chunk, clock)
    stats = TransitionStats(clock() - start, exchange_s, moved, exchange_rounds=rounds)
    logger.info(
        "fused %d replicas into a pipeline in %.1f ms (KV exchange %.1f ms in %d rounds): %d running requests, "
        "%d sub-blocks", g, stats.duration_s * 1e3, exchange_s * 1e3, rounds, len(group.scheduler.running), moved,
    )
    return group, stats


def split(group: LLMEngine, members: list[LLMEngine]) -> tuple[list[RequestOutput], TransitionStats]:
    """Turn the group back into its member replicas; returns the outputs of the steps that
    were still in flight (the caller delivers them). SplitRefused when the members cannot
    take the requests' KV now: the group then runs on as it was."""
    clock = group.clock
    start = clock()
    outputs = group.drain()
    group.finish_between_steps()  # an overlapped exchange still under way
    blocks = group.block_manager
    executor = group.executor
    if not isinstance(blocks, StagedBlockManager) or not isinstance(executor, FusedGroupExecutor):
        raise TypeError("split: not a group made by fuse")
    g = len(members)
    executors = executor.members
    ranks = [e.global_ranks[0] for e in executors]
    num_layers = executors[0].layout.num_layers
    running, waiting = group.hand_over()
    set_aside: list[list[int]] = [[] for _ in executors]
    try:
        _evacuate_dropped_memory(executors, blocks, running, num_layers, set_aside)
        homes, home_blocks, local, transfers = _gather_plan(members, blocks, running)
    except SplitRefused as refused:
        # The KV moved so far is bound where it went; the dropped layers' sub-blocks serve the group again.
        for stage, ids in zip(blocks.stages, set_aside):
            stage.give(ids)
        group.scheduler.adopt(running, waiting)
        raise SplitRefused(str(refused), outputs) from None
    exchange_start = clock()
    for h, (sources, dests) in enumerate(local):
        if sources:
            executors[h].call(0, DeviceCalls.move_kv, sources, dests)
    moved = _exchange(executors, transfers)
    exchange_s = clock() - exchange_start
    weights_start = clock()
    _restore_weights(executors, ranks, num_layers)
    weights_s = clock() - weights_start
    for h in range(g - 1):  # the samplers' states follow the requests to their homes
        mine = [seq for seq, home in zip(running, homes) if home == h] + waiting[h::g]
        _move_sampler_states(executors, g - 1, h, [s.request_id for s in mine])
    for h, member in enumerate(members):
        member.reset_block_pool()
        mine = [seq for seq, home in zip(running, homes) if home == h]
        for seq in mine:
            seq.block_ids = home_blocks[seq.request_id]
            member.block_manager.claim(seq.block_ids)
        member.take_over(group, mine, waiting[h::g])
    stats = TransitionStats(clock() - start, exchange_s, moved, weights_s)
    logger.info(
        "split a pipeline into %d replicas in %.1f ms (KV moves %.1f ms): %d running requests, %d sub-blocks",
        g, stats.duration_s * 1e3, exchange_s * 1e3, len(running), moved,
    )
    return outputs, stats


def _gather_plan(
    members: list[LLMEngine], blocks: StagedBlockManager, running: list[Sequence]
) -> tuple[list[int], dict[str, list[int]], list[tuple[list[int], list[int]]], Transfers]:
    """Each running request's home, the free full blocks there that will hold its KV, and the
    copies that gather it there: within the home's device (local), and from the other stages."""
    g = len(members)
    free_full = []
    for h, member in enumerate(members):
        pool = np.sort(np.fromiter(member.block_manager.pool, dtype=np.int64))[::-1]
        free = np.zeros(int(pool.max()) * g + g, dtype=bool)
        free_ids = np.fromiter(blocks.stages[h].free_ids(), dtype=np.int64)
        free[free_ids[free_ids < len(free)]] = True
        free_full.append(pool[free[sub_block_ids(pool, g)].reshape(-1, g).all(axis=1)].tolist())
    homes = _choose_homes(running, [len(ids) for ids in free_full])
    transfers: Transfers = {}
    local: list[tuple[list[int], list[int]]] = [([], []) for _ in members]
    home_blocks: dict[str, list[int]] = {}
    for h, member in enumerate(members):
        mine = [seq for seq, home in zip(running, homes) if home == h]
        need = sum(len(seq.block_ids) for seq in mine)
        if len(free_full[h]) < need:
            raise SplitRefused(f"split: replica {h} needs {need} free blocks for its requests, has {len(free_full[h])}")
        targets = iter(free_full[h][:need])
        for seq in mine:
            full = [next(targets) for _ in seq.block_ids]
            home_blocks[seq.request_id] = full
            ids = np.asarray(seq.block_ids)
            for r in range(g):
                sources = blocks.physical[r, ids].tolist()
                dests = sub_block_ids(full, g, r).tolist()
                pair = local[h] if r == h else transfers.setdefault((r, h), ([], []))
                pair[0].extend(sources)
                pair[1].extend(dests)
    return homes, home_blocks, local, transfers


def _move_sampler_states(executors: list[WorkerExecutor], src: int, dst: int, request_ids: list[str]) -> None:
    """Seeded requests keep their random streams when another device samples for them."""
    states = executors[src].call(0, DeviceCalls.take_sampler_states, request_ids)
    if states:
        executors[dst].call(0, DeviceCalls.give_sampler_states, states)


def _exchange(executors: list[WorkerExecutor], transfers: Transfers) -> int:
    """Run the KV transfers, all devices at once, each pair by its path (kunserve/cluster/
    links.py: a pull from the source's arena on one host, a send and a receive across two;
    sources and destinations never overlap, so nothing races)."""
    for pending in post_transfers(executors, transfers):
        pending.wait()
    return sum(len(sources) for sources, _ in transfers.values())


def _evacuate_dropped_memory(
    executors: list[WorkerExecutor], blocks: StagedBlockManager, running: list[Sequence], num_layers: int,
    set_aside: list[list[int]],
) -> None:
    """Move KV out of the sub-blocks that lie in dropped layers' slots, so the slots can be
    reclaimed. `set_aside[r]` gets the slots' sub-blocks taken from stage r's pool (free ones,
    and those the KV left): a refused split gives them back."""
    g = len(executors)
    layout = executors[0].layout
    bound = np.asarray([b for seq in running for b in seq.block_ids], dtype=np.int64)
    for r, (executor, stage) in enumerate(zip(executors, blocks.stages)):
        slot_ids = set(layout.released_sub_blocks_of_stage(r, g))
        free_slots = [i for i in slot_ids if stage.is_free(i)]
        stage.claim(free_slots)  # so nothing is moved into them
        set_aside[r].extend(free_slots)
        inside = [int(logical) for logical in bound if int(blocks.physical[r, logical]) in slot_ids]
        if not inside:
            continue
        if stage.num_free_blocks < len(inside):
            raise SplitRefused(f"split: stage {r} has no room outside the dropped layers for {len(inside)} blocks")
        targets = stage.take(len(inside))
        executor.call(0, DeviceCalls.move_kv, blocks.physical[r, inside].tolist(), targets)
        set_aside[r].extend(blocks.physical[r, inside].tolist())
        blocks.physical[r, inside] = targets


def _choose_homes(running: list[Sequence], free_blocks: list[int]) -> list[int]:
    """Each running request's replica after the split: the one with the most free full
    blocks left (`free_blocks`: each replica's now)."""
    room = list(free_blocks)
    homes = []
    for seq in running:
        home = max(range(len(room)), key=room.__getitem__)
        room[home] -= len(seq.block_ids)
        homes.append(home)
    return homes


def _restore_weights(executors: list[WorkerExecutor], ranks: list[int], num_layers: int) -> None:
    """Refill each member's dropped layers from the stages that kept them, all members at once
    (a kept layer's slot is only read): from their arenas on one host, over the network from
    the members on other hosts (kunserve/cluster/links.py)."""
    g = len(executors)
    owner = {layer: r for r in range(g) for layer in stage_layers(num_layers, r, g)}
    refilling = []
    for h, executor in enumerate(executors):
        refill = {layer: ranks[r] for layer, r in owner.items() if r != h}
        remote = [ranks[r] for r, other in enumerate(executors) if not share_host(executor, other)]
        refilling.append(executor.post(0, DeviceCalls.become_replica, refill, remote or None))
    for pending in refilling:
        pending.wait()
