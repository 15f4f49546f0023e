"""`kunserve`: drop replicated parameters under KV overload (the KunServe paper).

A drop is due when a replica's queued KV demand exceeds its free blocks for `drop_after_s`;
the planner (kunserve/cluster/planner.py) then picks its partners and the group's size, and
the drops planned at one check run side by side. A restore is due when the planner finds a
group's demand fits in `restore_fill` of its members' replica capacity for `restore_after_s`
(hysteresis: the two thresholds and durations keep it from flapping)."""

from __future__ import annotations

import functools
import logging

from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.links import host_of
from kunserve.cluster.planner import Planner, ReplicaLoad
from kunserve.cluster.policies.base import OverloadPolicy, OverloadTimer
from kunserve.cluster.runner import Group, TransitionRunner
from kunserve.cluster.transitions import SplitRefused
from kunserve.cluster.view import ClusterView

logger = logging.getLogger(__name__)


class KunServePolicy(OverloadPolicy):
    name = "kunserve"

    def __init__(self, config: CoordinatorConfig, cluster: ClusterView, runner: TransitionRunner) -> None:
        super().__init__(config, cluster, runner)
        first = cluster.engines[0]
        self.planner = Planner(config.planner_config(first.spec.num_layers), first.cost_model)
        self.overloads = OverloadTimer(config.drop_after_s)
        self._calm_since: dict[int, float] = {}  # by id(group)
        self._host_numbers: dict[str, int] = {}  # the planner's number of each host, in order of first sight

    def watches(self) -> bool:
        return bool(self.planner.config.group_sizes(len(self.cluster.engines)))

    def check(self, now: float) -> None:
        free = self.runner.replicas_in_replica_mode()
        due = self.overloads.update(now, {i: self.cluster.engines[i] for i in free})
        if due:
            self.cluster.run_together([
                functools.partial(self.runner.drop, planned.members,
                                  reason=f"replicas {sorted(due & set(planned.members))} overloaded; "
                                         f"predicted slowdown {planned.predicted_slowdown:.2f}x")
                for planned in self.planner.plan_drops([self.replica_load(i) for i in free])
                if due & set(planned.members)
            ])
            return
        self.cluster.run_together([functools.partial(self._restore, group) for group in self._calm_groups(now)])

    def is_idle(self) -> bool:
        return not self.runner.groups and not self.overloads.timing and all(
            engine.scheduler.num_waiting_blocks == 0 for engine in self.cluster.engines)

    def _calm_groups(self, now: float) -> list[Group]:
        """Groups whose demand has fitted their replicas for `restore_after_s`."""
        groups = list(self.runner.groups)
        self._calm_since = {key: since for key, since in self._calm_since.items()
                            if any(id(group) == key for group in groups)}
        calm = []
        for group in groups:
            members = [self.replica_load(m) for m in group.members]
            if self.planner.restore_is_worth(group.engine.kv_demand_blocks(), members):
                since = self._calm_since.setdefault(id(group), now)
                if now - since >= self.config.restore_after_s:
                    calm.append(group)
            else:
                self._calm_since.pop(id(group), None)
        return calm

    def _restore(self, group: Group) -> None:
        try:
            self.runner.restore_group(group, reason="demand fits the replicas again")
        except SplitRefused as error:
            logger.warning("restore put off: %s", error)
            self._calm_since.pop(id(group), None)

    def replica_load(self, index: int) -> ReplicaLoad:
        """Replica `index` as the planner sees it (its own engine: in a group, its replica-mode
        capacity)."""
        engine = self.cluster.engines[index]
        layout = engine.executor.layout
        running = engine.scheduler.running
        return ReplicaLoad(
            index,
            engine.kv_demand_blocks(),
            engine.block_manager.num_total_blocks,
            weight_blocks=layout.num_layers * len(layout.released_blocks(0)),
            running=len(running),
            context_tokens=sum(seq.num_computed_tokens for seq in running),
            host=self._host_numbers.setdefault(host_of(engine.executor), len(self._host_numbers)),
        )
