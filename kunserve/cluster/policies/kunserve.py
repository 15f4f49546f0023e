"""`kunserve`: drop replicated parameters under memory overload (the KunServe paper).

When a drop is due: when a replica's queued requests have waited for memory (KV blocks or
sequence slots: kunserve/engine/scheduler.py says why each step left requests queued) for
`drop_after_s`. A queue that waits for the token budget is compute-bound: freeing memory
would not admit it sooner, so it never drops. The planner (kunserve/cluster/planner.py) sizes
each group for the demand to come (kunserve/cluster/demand.py: the forecast peak of its
requests, queued prompts and the growth of running ones) and picks its partners; a drop is
made only when the group, running the queue it admits, keeps `min_drop_gain` of its members'
decode throughput (Planner.drop_gain: a compute-bound pair would only slow down). The drops
planned at one check run side by side. A group whose requests still wait for memory that
long grows: each of its stages splits with further replicas (2 -> 4 -> 8,
kunserve/cluster/growth.py), as far as `max_group_size` and the free replicas allow; where no
larger group is possible it serves on, preempting as a replica does. Its engines preempt by
preemption_mode "auto": each victim's KV is swapped to host memory where that costs less time
than recomputing it, the host link's load counted (kunserve/engine/preemption.py), so where
drops cannot help it falls back to the better of swap and recompute.

A restore is due when the group's forecast demand fits in `restore_fill` of its members'
replica capacity (blocks and sequence slots) for the calm time: `restore_after_s`, doubled
for every drop-restore-drop cycle its members went through in a row (a drop within
`cycle_window_s` of their restore), so that the tail of a burst does not split a group only
to fuse it again. A group of four or more whose demand fits half of it as a group and the
other half as replicas shrinks so first, the reverse of its growth (8 -> 4 -> 2 -> replicas).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.demand import Demand, OutputLengths, forecast
from kunserve.cluster.links import host_of
from kunserve.cluster.planner import GroupLoad, PlannedGroup, Planner, ReplicaLoad
from kunserve.cluster.policies.base import OverloadPolicy, OverloadTimer, WaitWatch
from kunserve.cluster.runner import Group, TransitionRunner
from kunserve.cluster.transitions import SplitRefused
from kunserve.cluster.view import ClusterView
from kunserve.engine.llm_engine import LLMEngine
from kunserve.engine.scheduler import KV_BLOCKS, MEMORY_WAITS, SEQ_SLOTS

logger = logging.getLogger(__name__)

MAX_CALM_DOUBLINGS = 4  # the calm time a restore waits for grows to at most 16x restore_after_s
SHRINK_FACTOR = 2  # a group shrinks by half at a time (8 -> 4 -> 2), the reverse of its growth
RESTORE, SHRINK = "restore", "shrink"


class KunServePolicy(OverloadPolicy):
    name = "kunserve"
    preemption_mode = "auto"

    def __init__(self, config: CoordinatorConfig, cluster: ClusterView, runner: TransitionRunner) -> None:
        super().__init__(config, cluster, runner)
        first = cluster.engines[0]
        self.planner = Planner(config.planner_config(first.spec.num_layers), first.cost_model)
        self.waits = WaitWatch()
        self.lengths = OutputLengths()
        self.replica_overloads = OverloadTimer(config.drop_after_s)  # by replica index
        self.group_overloads = OverloadTimer(config.drop_after_s)  # by id(group)
        self._calm_since: dict[int, float] = {}  # by id(group)
        self._restored_at: dict[int, float] = {}  # by replica: when its last group split
        self._cycles: dict[int, int] = {}  # by replica: drop-restore-drop cycles in a row
        self._host_numbers: dict[str, int] = {}  # the planner's number of each host, in order of first sight

    def watches(self) -> bool:
        return bool(self.planner.config.group_sizes(len(self.cluster.engines)))

    def check(self, now: float) -> None:
        groups = list(self.runner.groups)
        engines = self.cluster.engines
        self.lengths.collect([*engines, *(group.engine for group in groups)])
        free = self.runner.replicas_in_replica_mode()
        waits = {i: self.waits.reason(engines[i]) for i in free}
        due = self.replica_overloads.update(now, {i: waits[i] in MEMORY_WAITS for i in free})
        group_waits = {id(group): self.waits.reason(group.engine) for group in groups}
        crowded = self.group_overloads.update(now, {key: wait in MEMORY_WAITS for key, wait in group_waits.items()})
        taken: set[int] = set()
        actions = self._drops(now, due, free, waits, taken) if due else []
        actions += self._growths(now, [g for g in groups if id(g) in crowded], free, group_waits, taken)
        if actions:
            self.cluster.run_together(actions)
            return
        self.cluster.run_together([functools.partial(self._restore, group, action, now)
                                   for group, action in self._calm_groups(now)])

    def is_idle(self) -> bool:
        return not self.runner.groups and not self.replica_overloads.timing and all(
            engine.scheduler.num_waiting_blocks == 0 for engine in self.cluster.engines)

    # ---- drops and growths ---------------------------------------------------------------------

    def _drops(self, now: float, due: set[int], free: list[int], waits: dict[int, str | None], taken: set[int]
               ) -> list[Callable[[], object]]:
        loads = [self.replica_load(i) for i in free]
        actions = []
        by_index = {load.replica: load for load in loads}
        for planned in self.planner.plan_drops(loads, due):
            overloaded = sorted(due & set(planned.members))
            gain = self.planner.drop_gain([by_index[m] for m in planned.members])
            if gain < self.config.min_drop_gain:
                logger.debug("no drop of %s: its decode throughput would be %.2fx the replicas'", planned.members, gain)
                continue
            why = "; ".join(self._wait_words(self.cluster.engines[i], f"replica {i}", waits[i],
                                             self.replica_overloads.lasted(i, now)) for i in overloaded)
            reason = (f"{waits[overloaded[0]]}: {why}; {self._sizing_words(planned)}; decode throughput "
                      f"{gain:.2f}x the replicas'")
            self.note_fused(planned.members, now)
            taken.update(planned.members)
            actions.append(functools.partial(self.runner.drop, planned.members, reason=reason))
        return actions

    def _growths(self, now: float, crowded: list[Group], free: list[int], waits: dict[int, str | None],
                 taken: set[int]) -> list[Callable[[], object]]:
        if not crowded:
            return []
        groups = list(self.runner.groups)
        loads = {id(group): self.group_load(group) for group in groups}
        replicas = {i: self.replica_load(i) for i in free}
        actions = []
        for group in crowded:
            if taken & set(group.members):
                continue
            others = [other for other in groups if other is not group and len(other.members) == len(group.members)
                      and not taken & set(other.members)]
            planned = self.planner.plan_growth(loads[id(group)], [load for i, load in replicas.items() if i not in taken],
                                               [loads[id(other)] for other in others])
            if planned is None:
                continue  # it serves on as it is, preempting as a replica does
            why = self._wait_words(group.engine, f"group {group.members}", waits[id(group)],
                                   self.group_overloads.lasted(id(group), now))
            absorbed = [others[i] for i in planned.absorbs]
            merged = "".join(f", merging group {other.members}" for other in absorbed)
            reason = f"{waits[id(group)]}: {why}{merged}; {self._sizing_words(planned)}"
            self.note_fused(planned.members, now)
            taken.update(planned.members)
            actions.append(functools.partial(self.runner.grow, [group, *absorbed], planned.members, reason=reason))
        return actions

    def note_fused(self, members: list[int], now: float) -> None:
        """Count a drop-restore-drop cycle for replicas fused again within cycle_window_s of
        their group's restore (it lengthens their next group's calm time)."""
        cycled = any(now - self._restored_at.get(m, -float("inf")) <= self.config.cycle_window_s for m in members)
        cycles = 1 + max(self._cycles.get(m, 0) for m in members) if cycled else 0
        for m in members:
            self._cycles[m] = cycles

    @staticmethod
    def _wait_words(engine: LLMEngine, who: str, wait: str | None, lasted: float) -> str:
        scheduler = engine.scheduler
        if wait == KV_BLOCKS:
            return (f"{who}'s requests waited for KV blocks for {lasted:.2f} s ({scheduler.num_waiting_blocks} "
                    f"blocks queued, {engine.block_manager.num_free_blocks} free)")
        if wait == SEQ_SLOTS:
            return (f"{who}'s requests waited for sequence slots for {lasted:.2f} s ({len(scheduler.running)} "
                    f"running of {scheduler.max_num_seqs}, {len(scheduler.waiting)} queued)")
        return f"{who}: {wait}"

    @staticmethod
    def _sizing_words(planned: PlannedGroup) -> str:
        return (f"a group of {len(planned.members)} for a forecast peak of {planned.demand_blocks} blocks "
                f"({planned.capacity_blocks} after the drop); predicted slowdown {planned.predicted_slowdown:.2f}x")

    # ---- restores ------------------------------------------------------------------------------

    def _calm_groups(self, now: float) -> list[tuple[Group, str]]:
        """Groups whose forecast demand has fitted their replicas (RESTORE), or the half of
        them a shrink leaves (SHRINK: a group of four or more on one host), for their calm
        time; with what to do."""
        groups = list(self.runner.groups)
        keys = {id(group) for group in groups}
        self._calm_since = {key: since for key, since in self._calm_since.items() if key in keys}
        calm = []
        for group in groups:
            members = [self.member_load(m) for m in group.members]
            demand = forecast(group.engine, self.lengths)
            action = None
            if self.planner.restore_is_worth(demand.peak_blocks, members, demand.seqs):
                action = RESTORE
            elif len({m.host for m in members}) == 1 and self.planner.shrink_is_worth(
                    demand.peak_blocks, members, demand.seqs, SHRINK_FACTOR):
                action = SHRINK
            if action is None:
                self._calm_since.pop(id(group), None)
                continue
            since = self._calm_since.setdefault(id(group), now)
            if now - since >= self.calm_time(group.members):
                calm.append((group, action))
        return calm

    def calm_time(self, members: list[int]) -> float:
        """How long the demand of a group of `members` must fit before it restores or shrinks."""
        cycles = max(self._cycles.get(m, 0) for m in members)
        return self.config.restore_after_s * 2 ** min(cycles, MAX_CALM_DOUBLINGS)

    def _restore(self, group: Group, action: str, now: float) -> None:
        calm_s = self.calm_time(group.members)
        words = "the replicas" if action == RESTORE else f"a group of {len(group.members) // SHRINK_FACTOR} and replicas"
        reason = f"demand_fits: the forecast demand fitted {self.config.restore_fill:.0%} of {words} for {calm_s:g} s"
        try:
            if action == RESTORE:
                self.runner.restore_group(group, reason=reason)
            else:
                self.runner.shrink(group, SHRINK_FACTOR, reason=reason)
        except SplitRefused as error:
            logger.warning("%s put off: %s", action, error)
            self._calm_since.pop(id(group), None)
            return
        self.note_released(group.members if action == RESTORE else
                           [m for s, m in enumerate(group.members) if s % SHRINK_FACTOR], now)

    def note_released(self, members: list[int], now: float) -> None:
        """These replicas left their group (a restore, or a shrink) at `now`."""
        for m in members:
            self._restored_at[m] = now

    # ---- what the planner sees -----------------------------------------------------------------

    def group_load(self, group: Group) -> GroupLoad:
        demand = forecast(group.engine, self.lengths)
        return GroupLoad([self.member_load(m) for m in group.members], demand.peak_blocks, demand.seqs)

    def replica_load(self, index: int) -> ReplicaLoad:
        """Replica `index` (in replica mode) as the planner sees it: its capacity, and its
        requests' forecast demand."""
        return self._load(index, forecast(self.cluster.engines[index], self.lengths))

    def member_load(self, index: int) -> ReplicaLoad:
        """A group's member as the planner sees it: its replica-mode capacity and weights (the
        group's engine holds the demand)."""
        return self._load(index, None)

    def _load(self, index: int, demand: Demand | None) -> ReplicaLoad:
        engine = self.cluster.engines[index]
        layout = engine.executor.layout
        running = engine.scheduler.running if demand is not None else []
        queued = list(engine.scheduler.waiting) + list(engine.scheduler.swapped) if demand is not None else []
        return ReplicaLoad(
            index,
            0 if demand is None else demand.peak_blocks,
            engine.block_manager.num_total_blocks,
            weight_blocks=layout.num_layers * len(layout.released_blocks(0)),
            running=len(running),
            context_tokens=sum(seq.num_computed_tokens for seq in running),
            host=self._host_numbers.setdefault(host_of(engine.executor), len(self._host_numbers)),
            seqs=0 if demand is None else demand.seqs,
            seq_capacity=engine.config.max_num_seqs,
            queued_tokens=sum(len(seq) for seq in queued),
        )
