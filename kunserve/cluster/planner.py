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

from collections import defaultdict
from dataclasses import dataclass

from kunserve.engine.cost_model import CostModel, StepShape


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica in replica mode, as the planner sees it."""

    replica: int
    demand_blocks: int  # KV blocks in use plus the blocks its queued requests need
    capacity_blocks: int  # its KV blocks in replica mode
    weight_blocks: int  # blocks its decoder layers' weights occupy (what dropping can free)
    running: int = 0  # decoding requests
    context_tokens: int = 0  # their KV tokens, summed
    host: int = 0

    @property
    def spare_blocks(self) -> int:
        return self.capacity_blocks - self.demand_blocks


@dataclass(frozen=True)
class PlannedGroup:
    members: list[int]  # replica indices; member r becomes stage r
    demand_blocks: int
    capacity_blocks: int  # the group's KV blocks after the drop
    predicted_slowdown: float  # decode cycle of the group / its members' mean replica step
    spans_hosts: bool


@dataclass(frozen=True)
class PlannerConfig:
    num_layers: int
    max_group_size: int | None = None  # None: as many replicas as a deficit needs
    drop_headroom: float = 0.1  # fraction of a group's capacity left free after the drop
    restore_fill: float = 0.5  # restore when demand fits in this fraction of the replicas' capacity

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

    def covers(self, members: list[ReplicaLoad]) -> bool:
        demand = sum(m.demand_blocks for m in members)
        return demand <= (1 - self.config.drop_headroom) * self.group_capacity(members)

    def plan_drops(self, loads: list[ReplicaLoad]) -> list[PlannedGroup]:
        """Groups that cover the overloaded replicas among `loads` (replicas in replica mode).
        An overloaded replica no group of allowed size can cover gets the largest group the
        remaining replicas allow (it helps, though not enough); none when none is overloaded."""
        sizes = self.config.group_sizes(len(loads))
        overloaded = sorted((r for r in loads if r.spare_blocks < 0), key=lambda r: r.spare_blocks)
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

    def _planned(self, members: list[ReplicaLoad]) -> PlannedGroup:
        spans_hosts = len({m.host for m in members}) > 1
        return PlannedGroup([m.replica for m in members], sum(m.demand_blocks for m in members),
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

    def restore_is_worth(self, demand_blocks: int, members: list[ReplicaLoad]) -> bool:
        """A group may split when its whole demand fits in `restore_fill` of its members'
        replica capacity: after the split each replica has room to grow again."""
        return demand_blocks <= self.config.restore_fill * sum(m.capacity_blocks for m in members)
