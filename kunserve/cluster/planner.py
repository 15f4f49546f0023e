"""The drop planner: which replicas fuse into pipeline groups, how large each group is, and
when a group is worth restoring.

Fusing g replicas frees (g-1)/g of each member's decoder weights as KV memory, and costs
latency: a request then crosses g stages, each a hop. So the planner covers every
overloaded replica's deficit with groups as small as possible, whose partners bring the most
spare memory (on the same host first: a group spanning hosts sends its activations over the
network). Greedy: overloaded replicas in order of deficit, partners in order of spare
blocks; O(N log N) for the sorts, then linear. The cost model predicts each group's
slowdown (its decode cycle against its members' replica steps), for the log and operators.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass

from kunserve.engine.cost_model import CostModel, StepShape


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica in replica mode, as the planner sees it."""

    replica: int
    demand_blocks: int  # KV blocks its requests need: in use and queued, or their forecast peak
    capacity_blocks: int  # its KV blocks in replica mode
    weight_blocks: int  # blocks its decoder layers' weights occupy (what dropping can free)
    running: int = 0  # decoding requests
    context_tokens: int = 0  # their KV tokens, summed
    host: int = 0
    seqs: int = 0  # running and queued requests (each takes a sequence slot)
    seq_capacity: int | None = None  # its max_num_seqs (a group has its members' sum); None: no limit
    queued_tokens: int = 0  # the queued requests' known tokens, summed

    @property
    def spare_blocks(self) -> int:
        return self.capacity_blocks - self.demand_blocks


@dataclass(frozen=True)
class GroupLoad:
    """A group as the planner sees it: its members (their replica-mode capacity and weights,
    no demand of their own) and its requests' demand."""

    members: list[ReplicaLoad]  # in stage order
    demand_blocks: int
    seqs: int

    def spare_blocks(self, planner: Planner) -> int:
        return planner.group_capacity(self.members) - self.demand_blocks


@dataclass(frozen=True)
class PlannedGroup:
    members: list[int]  # replica indices; member r becomes stage r
    demand_blocks: int
    capacity_blocks: int  # the group's KV blocks after the drop
    predicted_slowdown: float  # decode cycle of the group / its members' mean replica step
    spans_hosts: bool
    absorbs: tuple[int, ...] = ()  # a growth: the other groups it merges (plan_growth's `others`)


@dataclass(frozen=True)
class PlannerConfig:
    num_layers: int
    max_group_size: int | None = None  # None: as many replicas as a deficit needs
    drop_headroom: float = 0.1  # fraction of a group's capacity left free after the drop
    restore_fill: float = 0.5  # restore when demand fits in this fraction of the replicas' capacity
    group_step_factor: float = 1.0  # a group's decode cycle over the cost model's (measured: CoordinatorConfig)

    def __post_init__(self) -> None:
        if self.max_group_size is not None and self.max_group_size < 2:
            raise ValueError(f"max_group_size: must be >= 2, got {self.max_group_size}")
        if not 0 <= self.drop_headroom < 1:
            raise ValueError(f"drop_headroom: must be in [0, 1), got {self.drop_headroom}")
        if not 0 < self.restore_fill <= 1:
            raise ValueError(f"restore_fill: must be in (0, 1], got {self.restore_fill}")

    def group_sizes(self, num_replicas: int) -> list[int]:
        return group_sizes(self.num_layers, num_replicas, self.max_group_size)


def group_sizes(num_layers: int, num_replicas: int, max_group_size: int | None) -> list[int]:
    """Sizes a group of at most `num_replicas` may have: divisors of the layer count (each
    stage holds L/g layers), up to `max_group_size`."""
    limit = min(num_replicas, max_group_size or num_replicas, num_layers)
    return [g for g in range(2, limit + 1) if num_layers % g == 0]


class Planner:
    def __init__(self, config: PlannerConfig, cost: CostModel) -> None:
        self.config = config
        self.cost = cost

    def group_capacity(self, members: list[ReplicaLoad]) -> int:
        """KV blocks of these replicas fused into one group: their own, plus the (g-1)/g of
        each member's weights that the drop releases."""
        g = len(members)
        return sum(m.capacity_blocks + m.weight_blocks * (g - 1) // g for m in members)

    def covers(self, members: list[ReplicaLoad], extra_blocks: int = 0, extra_seqs: int = 0) -> bool:
        """Whether the group of `members` holds their demand (and `extra_*` more): blocks
        within its capacity less the headroom, and requests within its sequence slots (its
        members' sum)."""
        demand = sum(m.demand_blocks for m in members) + extra_blocks
        slots = [m.seq_capacity for m in members]
        seqs = sum(m.seqs for m in members) + extra_seqs
        seqs_fit = None in slots or seqs <= sum(s for s in slots if s is not None)
        return seqs_fit and demand <= (1 - self.config.drop_headroom) * self.group_capacity(members)

    def plan_drops(self, loads: list[ReplicaLoad], due: set[int] | None = None) -> list[PlannedGroup]:
        """Groups that cover the overloaded replicas among `loads` (replicas in replica mode):
        those in `due` (None: those whose demand exceeds their capacity), most short of
        blocks first. An overloaded replica no group of allowed size can cover gets the
        largest group the remaining replicas allow (it helps, though not enough)."""
        sizes = self.config.group_sizes(len(loads))
        overloaded = sorted((r for r in loads if (r.spare_blocks < 0 if due is None else r.replica in due)),
                            key=lambda r: r.spare_blocks)
        if not overloaded or not sizes:
            return []
        by_host: dict[int, list[ReplicaLoad]] = defaultdict(list)
        for load in sorted(loads, key=lambda r: -r.spare_blocks):
            by_host[load.host].append(load)
        used: set[int] = set()
        cursor: dict[int, int] = defaultdict(int)  # per host: partners before this are taken

        def partners(host: int):
            """Free replicas by spare memory, this host's first."""
            for h in [host, *(h for h in by_host if h != host)]:
                queue = by_host[h]
                while cursor[h] < len(queue):
                    candidate = queue[cursor[h]]
                    cursor[h] += 1
                    if candidate.replica not in used:
                        yield candidate

        groups = []
        for first in overloaded:
            if first.replica in used:
                continue
            used.add(first.replica)
            members = [first]
            for partner in partners(first.host):
                members.append(partner)
                used.add(partner.replica)
                if len(members) in sizes and self.covers(members):
                    break
                if len(members) == sizes[-1]:
                    break
            while len(members) not in sizes and len(members) > 1:  # ran out: the largest allowed size
                used.discard(members.pop().replica)
            if len(members) < 2:
                used.discard(first.replica)
                continue
            groups.append(self._planned(members))
        return groups

    def plan_growth(self, group: GroupLoad, free: list[ReplicaLoad], others: list[GroupLoad]) -> PlannedGroup | None:
        """The group an overloaded `group` grows into, k units of its size g (kunserve/cluster/
        growth.py): itself, and g replicas from `free` (replicas in replica mode) or another
        group of its size from `others` per further unit, replicas first (on its host
        first, then by spare blocks), then the groups with most spare blocks. k is the
        smallest factor whose group covers the demand, else the largest there are units for.
        The members come in stage order (stage k·r + u is unit u's r-th member) and the
        groups merged in as `absorbs` (indices into `others`). None when no larger group is
        possible."""
        g = len(group.members)
        units = len(free) // g + len(others)
        factors = [size // g for size in self.config.group_sizes(g * (1 + units)) if size > g and size % g == 0]
        host = group.members[0].host
        ranked = sorted(free, key=lambda r: (r.host != host, -r.spare_blocks))
        # (unit, its index in `others`; None for g replicas)
        candidates: list[tuple[GroupLoad, int | None]] = [
            (GroupLoad(ranked[i * g: (i + 1) * g], 0, 0), None) for i in range(len(ranked) // g)]
        candidates += sorted(((other, i) for i, other in enumerate(others) if len(other.members) == g),
                             key=lambda c: -c[0].spare_blocks(self))
        chosen: list[tuple[GroupLoad, int | None]] | None = None
        for k in factors:
            if len(candidates) < k - 1:
                break
            chosen = [(group, None), *candidates[: k - 1]]
            units = [unit for unit, _ in chosen]
            if self.covers([m for unit in units for m in unit.members], sum(u.demand_blocks for u in units),
                           sum(u.seqs for u in units)):
                break
        if chosen is None:
            return None
        order = [unit.members[r] for r in range(g) for unit, _ in chosen]
        planned = self._planned(order, sum(unit.demand_blocks for unit, _ in chosen))
        return dataclasses.replace(planned, absorbs=tuple(i for _, i in chosen if i is not None))

    def _planned(self, members: list[ReplicaLoad], extra_blocks: int = 0) -> PlannedGroup:
        spans_hosts = len({m.host for m in members}) > 1
        return PlannedGroup([m.replica for m in members], sum(m.demand_blocks for m in members) + extra_blocks,
                            self.group_capacity(members), self.predicted_slowdown(members, spans_hosts), spans_hosts)

    def predicted_slowdown(self, members: list[ReplicaLoad], spans_hosts: bool = False) -> float:
        """The group's decode cycle for all its members' running requests, against the mean
        of the members' own replica steps."""
        layers = self.config.num_layers
        shapes = [StepShape(m.running, m.context_tokens, 0, m.running) for m in members]
        replica = sum(self.cost.step_time(s, layers) for s in shapes) / len(shapes)
        total = StepShape()
        for shape in shapes:
            total += shape
        link = "network" if spans_hosts else "device"
        group = self.cost.pipeline_cycle_time(total, layers, len(members), link)
        return group / replica

    def drop_gain(self, members: list[ReplicaLoad]) -> float:
        """Decode tokens per second of the group of `members` running their requests and as
        many of their queued ones as its sequence slots take, against the members running
        their own requests as replicas (> 1: the memory a drop frees buys more than the
        pipeline costs). Decode steps only, from the cost model; the group's cycle times
        `group_step_factor`, as measured."""
        layers = self.config.num_layers
        replicas = sum(m.running / self.cost.step_time(StepShape(m.running, m.context_tokens, 0, m.running), layers)
                       for m in members if m.running)
        slots = [m.seq_capacity for m in members]
        queued = sum(m.seqs - m.running for m in members)
        room = queued if None in slots else max(0, sum(s for s in slots if s is not None) - sum(m.running for m in members))
        admitted = min(queued, room)
        queued_tokens = sum(m.queued_tokens for m in members) * admitted // max(queued, 1)
        n = sum(m.running for m in members) + admitted
        if n == 0:
            return 1.0
        context = sum(m.context_tokens for m in members) + queued_tokens
        cycle = self.cost.pipeline_cycle_time(StepShape(n, context, 0, n), layers, len(members))
        group = n / (cycle * self.config.group_step_factor)
        return group / replicas if replicas else math.inf

    def shrink_is_worth(self, demand_blocks: int, members: list[ReplicaLoad], seqs: int, factor: int) -> bool:
        """A group of `members` (in stage order) may shrink by `factor` (kunserve/cluster/
        growth.py: stages 0, k, 2k, ... stay a group, the others leave as replicas) when its
        demand fits in `restore_fill` of what they hold after it."""
        kept, leaving = members[::factor], [m for s, m in enumerate(members) if s % factor]
        if len(kept) < 2:
            return False
        capacity = self.group_capacity(kept) + sum(m.capacity_blocks for m in leaving)
        fill = self.config.restore_fill
        slots = [m.seq_capacity for m in members]
        seqs_fit = None in slots or seqs <= fill * sum(s for s in slots if s is not None)
        return seqs_fit and demand_blocks <= fill * capacity

    def restore_is_worth(self, demand_blocks: int, members: list[ReplicaLoad], seqs: int = 0) -> bool:
        """A group may split when its whole demand (blocks, and `seqs` requests) fits in
        `restore_fill` of its members' replica capacity (blocks, and sequence slots): after
        the split each replica has room to grow again."""
        fill = self.config.restore_fill
        slots = [m.seq_capacity for m in members]
        seqs_fit = None in slots or seqs <= fill * sum(s for s in slots if s is not None)
        return seqs_fit and demand_blocks <= fill * sum(m.capacity_blocks for m in members)
