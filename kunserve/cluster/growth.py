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

Shrinking is the inverse: stage k·r widens back, refilling the layers of stages
k·r + 1 .. k·r + k-1 from the devices there, which leave as replicas; each running request's
KV is gathered where it goes (the kept group, or a leaving replica), as a restore does.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque

import numpy as np

from kunserve.cluster.links import host_of, replica_device
from kunserve.cluster.transitions import SplitRefused, Transfers, TransitionStats, _exchange, _move_sampler_states
from kunserve.engine.block_manager import BlockManager
from kunserve.engine.llm_engine import LLMEngine
from kunserve.engine.sequence import Sequence
from kunserve.engine.staged_block_manager import StagedBlockManager
from kunserve.executor.base import FusedGroupExecutor, WorkerExecutor
from kunserve.layout import stage_layers, sub_block_ids
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


def shrink(group: LLMEngine, stages: list[LLMEngine], k: int) -> tuple[LLMEngine, list[RequestOutput], TransitionStats]:
    """The g-stage group left when the (k·g)-stage `group` shrinks, the inverse of `grow`:
    stage k·r widens back to stage r of g, taking the layers of stages k·r + 1 .. k·r + k-1
    from the replicas there, which leave the group as replicas. `stages` are the replicas' own
    engines in the group's stage order (on one host: widening stages copy layers from their
    peers' mapped arenas). Each running request goes to the kept group or to a leaving
    replica, the one with most room, its KV gathered there into free memory outside the
    slots being refilled; the queue is shared out by size. Returns the kept group's engine
    and the outputs of the steps still in flight (the caller delivers them). SplitRefused
    (nothing changed: the group serves on) when the running requests' KV does not fit."""
    clock = group.clock
    start = clock()
    blocks, executor = group.block_manager, group.executor
    if not isinstance(blocks, StagedBlockManager) or not isinstance(executor, FusedGroupExecutor):
        raise TypeError("shrink: not a group made by a drop")
    size = len(stages)
    g = size // k
    executors = [replica_device(engine.executor, "shrink") for engine in stages]
    if executors != executor.members or size % k or g < 2:
        raise ValueError(f"stages: the group's {len(executor.members)} members in stage order, shrinking by a factor "
                         f"k that leaves a group of at least 2; got {size} stages and k={k}")
    if len({host_of(e) for e in executors}) > 1:
        raise ValueError("shrink: a group spanning hosts restores instead (widening stages map their peers' arenas)")
    outputs = group.drain()
    running, waiting = group.hand_over()
    try:
        plan = _shrink_plan(stages, blocks, running, k)
    except SplitRefused as refused:
        group.scheduler.adopt(running, waiting)
        raise SplitRefused(str(refused), outputs) from None
    exchange_start = clock()
    moved = 0
    for local, transfers in plan.rounds:
        for device, (sources, targets) in enumerate(local):
            if sources:
                executors[device].call(0, DeviceCalls.move_kv, sources, targets)
        moved += _exchange(executors, transfers) + sum(len(sources) for sources, _ in local)
    exchange_s = clock() - exchange_start
    weights_start = clock()
    released = _widen(executors, stages[0].spec.num_layers, k)
    weights_s = clock() - weights_start
    kept_running = [seq for seq, home in zip(running, plan.homes) if home == 0]
    shares = [[seq for i, seq in enumerate(waiting) if i % size == s] for s in range(size)]
    kept_waiting = [seq for s in range(0, size, k) for seq in shares[s]]
    last = size - 1  # the group's sampling stage leaves
    _move_sampler_states(executors, last, k * (g - 1), [seq.request_id for seq in kept_running + kept_waiting])
    pools = [BlockManager(stages[0].config.block_size,
                          sub_block_ids(np.fromiter(stages[k * r].block_manager.pool, dtype=np.int64), g).tolist()
                          + released[r])
             for r in range(g)]
    for seq in kept_running:
        rows = plan.kept_targets[seq.request_id]
        for r, pool in enumerate(pools):
            pool.claim(rows[r].tolist())
    kept_blocks = StagedBlockManager(stages[0].config.block_size, pools)
    for seq in kept_running:
        seq.block_ids = kept_blocks.bind(plan.kept_targets[seq.request_id].tolist())
    config = dataclasses.replace(group.config, pipeline_parallel_size=g,
                                 max_num_seqs=sum(stages[s].config.max_num_seqs for s in range(0, size, k)))
    kept = LLMEngine.for_group(group, config, executors[0].form_group(executors[::k], kept_blocks), kept_blocks)
    kept.take_over(group, kept_running, kept_waiting)
    kept.scheduler.running.sort(key=lambda seq: seq.age_key)
    kept.scheduler.waiting = deque(sorted(kept.scheduler.waiting, key=lambda seq: seq.arrival_order))
    for s in range(size):
        if s % k:
            mine = [seq for seq, home in zip(running, plan.homes) if home == s]
            if s != last:
                _move_sampler_states(executors, last, s, [seq.request_id for seq in mine + shares[s]])
            member = stages[s]
            member.reset_block_pool()
            for seq in mine:
                seq.block_ids = plan.home_blocks[seq.request_id]
                member.block_manager.claim(seq.block_ids)
            member.take_over(group, mine, shares[s])
    stats = TransitionStats(clock() - start, exchange_s, moved, weights_s)
    logger.info("shrank a %d-stage group to %d stages in %.1f ms (KV moves %.1f ms, weights %.1f ms): %d running "
                "requests, %d sub-blocks", size, g, stats.duration_s * 1e3, exchange_s * 1e3, weights_s * 1e3,
                len(running), moved)
    return kept, outputs, stats


Copies = list[tuple[list[int], list[int]]]  # per device: copies within it (sources, targets)


@dataclasses.dataclass
class ShrinkPlan:
    homes: list[int]  # per running request: 0 (the kept group) or the stage of the replica it goes to
    kept_targets: dict[str, np.ndarray]  # kept requests: [g, blocks] sub-blocks of the kept stages
    home_blocks: dict[str, list[int]]  # requests going to a replica: its full blocks there
    rounds: list[tuple[Copies, Transfers]]  # the copies, round after round


class GatherRound:
    """One round of a shrink's copies: within devices (local), between them (transfers), and
    the sources they leave free once done."""

    def __init__(self, size: int) -> None:
        self.local: Copies = [([], []) for _ in range(size)]
        self.transfers: Transfers = {}
        self.freed: list[list[int]] = [[] for _ in range(size)]

    def copy(self, src: int, source_ids: np.ndarray, dst: int, target_ids: np.ndarray) -> None:
        pair = self.local[src] if src == dst else self.transfers.setdefault((src, dst), ([], []))
        pair[0].extend(source_ids.tolist())
        pair[1].extend(target_ids.tolist())
        self.freed[src].extend(source_ids.tolist())


def _shrink_plan(stages: list[LLMEngine], blocks: StagedBlockManager, running: list[Sequence], k: int) -> ShrinkPlan:
    """Where each running request's KV goes, and the copies that take it there: into free
    memory only, outside the slots the widening stages and the leaving replicas take back for
    weights. A destination needs whole units free (a kept stage's sub-block spans k of the
    group's; a replica's block, all of them), which a fragmented cache has few of: so the
    gathering runs in rounds, each placing the requests that find room and freeing what they
    leave. SplitRefused, before anything moves, when a round can place none."""
    size = len(stages)
    g = size // k
    free = [set(pool.free_ids()) for pool in blocks.stages]  # per device, as the group addresses it
    layout = stages[0].executor.layout
    units: dict[int, np.ndarray] = {}  # per destination (0: the kept group's stage r at r; s: the replica at s)
    for r in range(g):  # a kept stage's g-sized sub-block q spans k·q .. k·q + k-1 of the group's
        units[-1 - r] = np.sort(np.concatenate((
            sub_block_ids(np.fromiter(stages[k * r].block_manager.pool, dtype=np.int64), g),
            np.asarray(layout.released_sub_blocks_of_stage(r, g), dtype=np.int64))))[::-1]
    for s in range(size):
        if s % k:
            units[s] = np.sort(np.fromiter(stages[s].block_manager.pool, dtype=np.int64))[::-1]

    def free_units(key: int) -> deque[int]:
        device, span = (k * (-1 - key), k) if key < 0 else (key, size)
        parts = sub_block_ids(units[key], span).reshape(-1, span)
        whole = np.isin(parts, np.fromiter(free[device], dtype=np.int64, count=len(free[device]))).all(axis=1)
        return deque(units[key][whole].tolist())

    homes: dict[int, int] = {}
    kept_targets: dict[str, np.ndarray] = {}
    home_blocks: dict[str, list[int]] = {}
    rounds: list[tuple[Copies, Transfers]] = []
    pending = list(range(len(running)))
    while pending:
        room = {key: free_units(key) for key in units}
        room_of = {0: min(len(room[-1 - r]) for r in range(g)), **{s: len(room[s]) for s in units if s > 0}}
        copies = GatherRound(size)
        waiting = []
        for i in pending:
            seq = running[i]
            need = len(seq.block_ids)
            home = max(room_of, key=room_of.__getitem__)
            if room_of[home] < need:
                waiting.append(i)
                continue
            room_of[home] -= need
            homes[i] = home
            ids = np.asarray(seq.block_ids, dtype=np.int64)
            if home == 0:
                rows = np.asarray([[room[-1 - r].popleft() for _ in range(need)] for r in range(g)], dtype=np.int64)
                kept_targets[seq.request_id] = rows
                for t in range(size):
                    targets = k * rows[t // k] + t % k
                    copies.copy(t, blocks.physical[t, ids], k * (t // k), targets)
                    free[k * (t // k)].difference_update(targets.tolist())
            else:
                full = [room[home].popleft() for _ in range(need)]
                home_blocks[seq.request_id] = full
                for t in range(size):
                    targets = sub_block_ids(full, size, t)
                    copies.copy(t, blocks.physical[t, ids], home, targets)
                    free[home].difference_update(targets.tolist())
        if len(waiting) == len(pending):
            need = min(len(running[i].block_ids) for i in pending)
            raise SplitRefused(f"shrink: no destination has {need} free blocks for the {len(pending)} requests left")
        for device, ids in enumerate(copies.freed):
            free[device].update(ids)
        rounds.append((copies.local, copies.transfers))
        pending = waiting
    return ShrinkPlan([homes[i] for i in range(len(running))], kept_targets, home_blocks, rounds)


def _widen(executors: list[WorkerExecutor], num_layers: int, k: int) -> list[list[int]]:
    """Every device's role after a shrink by k, all at once: stage k·r becomes stage r of the
    kept group, refilling the layers it lacks from the stages that hold them; the others
    become replicas, refilling every layer they lack. Every refill reads a layer from the
    device holding it in the shrinking group, which keeps it. Returns the kept stages'
    released sub-blocks."""
    size = len(executors)
    g = size // k
    ranks = [e.global_ranks[0] for e in executors]
    owner = {layer: ranks[s] for s in range(size) for layer in stage_layers(num_layers, s, size)}
    widening = []
    for r in range(g):
        lacking = [layer for t in range(k * r + 1, k * r + k) for layer in stage_layers(num_layers, t, size)]
        widening.append(executors[k * r].post(0, DeviceCalls.become_stage, r, g, ranks[k * (r - 1)] if r else None,
                                              ranks[k * (r + 1)] if r < g - 1 else None,
                                              {layer: owner[layer] for layer in lacking}))
    leaving = [executors[s].post(0, DeviceCalls.become_replica, {layer: rank for layer, rank in owner.items()
                                                                  if rank != ranks[s]}, None)
               for s in range(size) if s % k]
    released = [pending.wait() for pending in widening]
    for pending in leaving:
        pending.wait()
    return released
