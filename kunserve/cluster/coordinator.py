"""The coordinator: when to drop (fuse replicas into a pipeline group) and when to restore,
and carrying it out on the live cluster while requests keep arriving.

State per replica: replica → (drop) → stage of a group → (restore) → replica. A drop is
due when a replica's queued KV demand exceeds its free blocks for `drop_after_s`; the
planner (kunserve/cluster/planner.py) then picks its partners and the group's size. A
restore is due when the planner finds a group's demand fits in `restore_fill` of its
members' replica capacity for `restore_after_s` (hysteresis: the two thresholds and
durations keep it from flapping). A transition pauses the members' engine loops between
steps, runs kunserve/cluster/transitions.py, and points the members' loops at the group (or
back). Transitions of disjoint replicas run side by side (`Cluster.run_together`): when a
burst overloads many replicas at once, the last pair's drop does not wait for all the others."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from kunserve.cluster import migration
from kunserve.cluster.links import host_of
from kunserve.cluster.planner import Planner, PlannerConfig, ReplicaLoad
from kunserve.cluster.transitions import SplitRefused, TransitionStats, fuse, split
from kunserve.engine.llm_engine import LLMEngine
from kunserve.engine.sequence import Sequence

if TYPE_CHECKING:
    from kunserve.cluster.cluster import Cluster
    from kunserve.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

# What a cluster does when a replica's KV cache overloads: kunserve drops replicated layers
# (fuses replicas into a pipeline group); the KV-centric baselines preempt and recompute
# (vLLM), preempt and swap KV to host memory (InferCept), or migrate running requests to
# lighter replicas (Llumnix).
OVERLOAD_POLICIES = ("kunserve", "recompute", "swap", "migrate")
HISTORY_LENGTH = 32  # transitions kept for GET /v1/cluster


@dataclass
class CoordinatorConfig:
    overload_policy: str = "kunserve"
    max_group_size: int | None = None  # largest group a drop forms; None: as large as the deficit needs
    drop_headroom: float = 0.1  # a drop's group keeps this fraction of its KV blocks free
    check_interval_s: float = 0.05
    drop_after_s: float = 0.2  # queued demand above free blocks this long: drop (or migrate)
    restore_after_s: float = 2.0  # demand within restore_fill of replica capacity this long: restore
    restore_fill: float = 0.5
    migrate_headroom: float = 0.1  # a migration's destination keeps this fraction of its KV blocks free
    max_migrations_per_check: int = 8

    def __post_init__(self) -> None:
        if self.overload_policy not in OVERLOAD_POLICIES:
            raise ValueError(f"overload_policy: expected one of {OVERLOAD_POLICIES}, got {self.overload_policy!r}")
        if not 0 <= self.migrate_headroom < 1:
            raise ValueError(f"migrate_headroom: must be in [0, 1), got {self.migrate_headroom}")
        if self.max_migrations_per_check < 1:
            raise ValueError(f"max_migrations_per_check: must be >= 1, got {self.max_migrations_per_check}")

    @property
    def preemption_mode(self) -> str:
        """How the engines preempt under this policy (EngineConfig.preemption_mode)."""
        return "swap" if self.overload_policy == "swap" else "recompute"

    def planner_config(self, num_layers: int) -> PlannerConfig:
        """The planner's settings (it checks the shared ones)."""
        return PlannerConfig(num_layers, self.max_group_size, self.drop_headroom, self.restore_fill)


@dataclass
class Group:
    members: list[int]  # replica indices; member r is stage r
    engine: LLMEngine
    formed_at: float  # the cluster's clock


@dataclass
class Transition:
    kind: str  # "drop" | "restore" | "migrate"
    members: list[int]  # a group's replicas; a migration's (source, destination)
    at: float  # the cluster's wall clock (time.time() on a live cluster)
    duration_s: float
    exchange_s: float  # KV moved between devices
    sub_blocks_moved: int
    reason: str
    pause_s: float  # how long the requests involved could not run


class Coordinator:
    def __init__(
        self, cluster: Cluster, config: CoordinatorConfig, on_transition: Callable[[Transition], None] | None = None
    ) -> None:
        self.cluster = cluster
        self.config = config
        self.on_transition = on_transition
        first = cluster.engines[0]
        self.planner = Planner(config.planner_config(first.spec.num_layers), first.cost_model)
        self.groups: list[Group] = []
        self.history: deque[Transition] = deque(maxlen=HISTORY_LENGTH)
        self._state_lock = threading.Lock()  # the groups and the replicas a transition holds
        self._held: set[int] = set()  # replicas a transition is under way on
        self._overloaded_since: dict[int, float] = {}
        self._calm_since: dict[int, float] = {}  # by id(group)
        self._host_numbers: dict[str, int] = {}  # the planner's number of each host, in order of first sight
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the policy loop ----------------------------------------------------------------------

    def start(self) -> None:
        policy, num_replicas = self.config.overload_policy, len(self.cluster.engines)
        drops = policy == "kunserve" and self.planner.config.group_sizes(num_replicas)
        if not drops and not (policy == "migrate" and num_replicas > 1):
            return
        self._thread = threading.Thread(target=self._watch, name="kunserve-coordinator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.config.check_interval_s):
            try:
                self.check(self.cluster.clock())
            except Exception:
                logger.exception("coordinator check failed; will look again")

    def check(self, now: float) -> None:
        """One look at the cluster: drop, restore or migrate where the policy says so."""
        config = self.config
        if config.overload_policy not in ("kunserve", "migrate"):
            return  # the engines handle overload on their own (preemption)
        free = self.replicas_in_replica_mode()
        for i in free:
            if self._deficit(i) > 0:
                self._overloaded_since.setdefault(i, now)
            else:
                self._overloaded_since.pop(i, None)
        due = {i for i, since in self._overloaded_since.items() if now - since >= config.drop_after_s and i in free}
        if config.overload_policy == "migrate":
            self.cluster.run_together([functools.partial(self._relieve_by_migration, src, dst)
                                       for src, dst in self._migration_pairs(sorted(due), free)])
            return
        if due:
            self.cluster.run_together([
                functools.partial(self.drop, planned.members,
                                  reason=f"replicas {sorted(due & set(planned.members))} overloaded; "
                                         f"predicted slowdown {planned.predicted_slowdown:.2f}x")
                for planned in self.planner.plan_drops([self.replica_load(i) for i in free])
                if due & set(planned.members)
            ])
            return
        restores = []
        for group in list(self.groups):
            members = [self.replica_load(m) for m in group.members]
            if self.planner.restore_is_worth(group.engine.kv_demand_blocks(), members):
                since = self._calm_since.setdefault(id(group), now)
                if now - since >= config.restore_after_s:
                    restores.append(functools.partial(self._restore_when_calm, group))
            else:
                self._calm_since.pop(id(group), None)
        self.cluster.run_together(restores)

    def _restore_when_calm(self, group: Group) -> None:
        try:
            self._restore(group, reason="demand fits the replicas again")
        except SplitRefused as error:
            logger.warning("restore put off: %s", error)
            self._calm_since.pop(id(group), None)

    def is_idle(self) -> bool:
        """Whether a check now would change nothing: the policy never acts, or no replica
        waits for blocks, no overload is being timed and no group exists (a simulation skips
        its checks then)."""
        if self.config.overload_policy not in ("kunserve", "migrate"):
            return True
        return not self.groups and not self._overloaded_since and all(
            engine.scheduler.num_waiting_blocks == 0 for engine in self.cluster.engines)

    def _deficit(self, replica: int) -> int:
        """Blocks replica's queued requests need beyond its free blocks (> 0: overloaded)."""
        engine = self.cluster.engines[replica]
        return engine.scheduler.num_waiting_blocks - engine.block_manager.num_free_blocks

    def _spare(self, replica: int) -> int:
        """Blocks a migration may bring to `replica`: free, less its queue and headroom."""
        blocks = self.cluster.engines[replica].block_manager
        headroom = int(self.config.migrate_headroom * blocks.num_total_blocks)
        return -self._deficit(replica) - headroom

    def _migration_pairs(self, overloaded: list[int], free: list[int]) -> list[tuple[int, int]]:
        """Each overloaded replica, most short of blocks first, with the replica of most spare
        blocks not yet taken: disjoint pairs, whose migrations run side by side."""
        pairs: list[tuple[int, int]] = []
        taken = set(overloaded)
        for src in sorted(overloaded, key=self._deficit, reverse=True):
            others = [i for i in free if i not in taken and self.cluster.replicas[i].is_alive]
            if not others:
                break
            dst = max(others, key=self._spare)
            taken.add(dst)
            pairs.append((src, dst))
        return pairs

    def _relieve_by_migration(self, src: int, dst: int) -> None:
        """Migrate the youngest of `src`'s running requests to `dst`, while `src` is short of
        blocks for its queue and `dst` has room."""
        target = self.cluster.engines[dst]
        for _ in range(self.config.max_migrations_per_check):
            if self._deficit(src) <= 0 or len(target.scheduler.running) >= target.config.max_num_seqs:
                return
            spare = self._spare(dst)
            # Read while the source steps (its requests are in flight then): the migration
            # checks again with the source paused.
            candidates = [seq for seq in reversed(list(self.cluster.engines[src].scheduler.running))
                          if len(seq.block_ids) < spare]
            if not candidates or self.migrate(candidates[0], src, dst, f"replica {src} overloaded") is None:
                return

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

    def default_drop_members(self) -> list[int]:
        """The replicas a drop takes when an operator names none: the largest group the
        replicas in replica mode allow."""
        free = self.replicas_in_replica_mode()
        sizes = self.planner.config.group_sizes(len(free))
        if not sizes:
            raise ValueError(f"replicas: the {len(free)} replica(s) in replica mode can form no group")
        return free[: sizes[-1]]

    # ---- transitions --------------------------------------------------------------------------

    def replicas_in_replica_mode(self) -> list[int]:
        grouped = {m for group in self.groups for m in group.members}
        return [i for i, r in enumerate(self.cluster.replicas) if i not in grouped and r.is_alive]

    @contextlib.contextmanager
    def _holding(self, replicas: list[int]) -> Iterator[None]:
        """Hold these replicas for one transition; refused (ValueError) while another holds any."""
        with self._state_lock:
            busy = self._held & set(replicas)
            if busy:
                raise ValueError(f"replicas: {sorted(busy)} are in another transition")
            self._held.update(replicas)
        try:
            yield
        finally:
            with self._state_lock:
                self._held.difference_update(replicas)

    def drop(self, members: list[int], reason: str = "requested") -> Transition:
        """Fuse these replicas (member r becomes stage r) into a pipeline group."""
        with self._holding(members):
            free = self.replicas_in_replica_mode()
            if len(members) < 2 or len(set(members)) != len(members) or not set(members) <= set(free):
                raise ValueError(f"replicas: {members} must be two or more distinct replicas in replica mode {free}")
            loops = [self.cluster.replicas[i] for i in members]
            paused_at = self.cluster.clock()
            for loop in loops:
                loop.pause()
            try:
                self.cluster.open_links(members)
                group_engine, stats = fuse([self.cluster.engines[i] for i in members])
                owner = loops[0]
                owner.engine = group_engine
                for loop in loops[1:]:
                    loop.merge_into(owner)
            except Exception as error:
                _fail_loops(loops, error, "drop")
                raise
            finally:
                for loop in loops:
                    loop.resume()
            with self._state_lock:
                self.groups.append(Group(members, group_engine, self.cluster.clock()))
            for i in members:
                self._overloaded_since.pop(i, None)
            return self._record("drop", members, stats, reason, self.cluster.clock() - paused_at)

    def restore(self, group_index: int = 0, reason: str = "requested") -> Transition:
        """Split a group back into its replicas."""
        if not 0 <= group_index < len(self.groups):
            raise ValueError(f"group: {group_index} is not one of the {len(self.groups)} groups")
        return self._restore(self.groups[group_index], reason)

    def _restore(self, group: Group, reason: str) -> Transition:
        with self._holding(group.members):
            loops = [self.cluster.replicas[i] for i in group.members]
            paused_at = self.cluster.clock()
            for loop in loops:
                loop.pause()
            try:
                outputs, stats = split(group.engine, [self.cluster.engines[i] for i in group.members])
                owner = loops[0]
                owner.engine = self.cluster.engines[group.members[0]]
                for loop in loops[1:]:
                    loop.unmerge()
                owner.deliver_from_thread(outputs)
            except SplitRefused as refused:
                loops[0].deliver_from_thread(refused.outputs)  # the group serves on
                raise
            except Exception as error:
                _fail_loops(loops, error, "restore")
                with self._state_lock:
                    self.groups.remove(group)
                raise
            finally:
                for loop in loops:
                    loop.resume()
            with self._state_lock:
                self.groups.remove(group)
            self._calm_since.pop(id(group), None)
            return self._record("restore", group.members, stats, reason, self.cluster.clock() - paused_at)

    def migrate(self, seq: Sequence, src: int, dst: int, reason: str = "requested") -> Transition | None:
        """Move running `seq` from replica `src` to `dst` (kunserve/cluster/migration.py);
        None when it was called off (the request moved on meanwhile)."""
        with self._holding([src, dst]):
            pair = [self.cluster.replicas[i] for i in sorted((src, dst))]
            if not self.cluster.links_open(src, dst):
                for loop in pair:
                    loop.pause()
                try:
                    self.cluster.open_links([src, dst])
                finally:
                    for loop in pair:
                        loop.resume()
            stats = migration.migrate(self.cluster, seq, src, dst)
            if stats is None:
                return None
            transition = Transition("migrate", [src, dst], self.cluster.wall_clock(), stats.duration_s, stats.pause_s,
                                    stats.blocks_moved, f"{reason}; request {stats.request_id}", stats.pause_s)
            return self._log(transition)

    def _record(self, kind: str, members: list[int], stats: TransitionStats, reason: str, pause_s: float
                ) -> Transition:
        """`pause_s`: how long the members' loops were held (their running steps ending, links
        opening, the transition itself): their requests' stall."""
        return self._log(Transition(kind, list(members), self.cluster.wall_clock(), stats.duration_s, stats.exchange_s,
                                    stats.sub_blocks_moved, reason, pause_s))

    def _log(self, transition: Transition) -> Transition:
        self.history.append(transition)
        logger.info("transition %s", asdict(transition))
        if self.on_transition is not None:
            self.on_transition(transition)
        return transition

    # ---- what operators see -------------------------------------------------------------------

    def mode_of(self, replica: int) -> str:
        return "pipeline" if any(replica in group.members for group in self.groups) else "replica"

    def engine_of(self, replica: int) -> LLMEngine:
        """The engine running the replica's requests now: its own, or its group's."""
        for group in self.groups:
            if replica in group.members:
                return group.engine
        return self.cluster.engines[replica]

    def layers_held(self, replica: int) -> int:
        num_layers = self.cluster.engines[replica].spec.num_layers
        for group in self.groups:
            if replica in group.members:
                return num_layers // len(group.members)
        return num_layers

    def describe(self) -> dict:
        engines = self.cluster.engines
        replicas = [
            {
                "replica": i,
                "mode": self.mode_of(i),
                "alive": self.cluster.replicas[i].is_alive,
                "layers_held": self.layers_held(i),
                "kv_usage": self.engine_of(i).block_manager.usage,
                "queued_demand_blocks": self.engine_of(i).scheduler.num_waiting_blocks,
                "num_running": len(self.engine_of(i).scheduler.running),
                "num_waiting": len(self.engine_of(i).scheduler.waiting),
            }
            for i in range(len(engines))
        ]
        groups = [
            {
                "members": group.members,
                "kv_usage": group.engine.block_manager.usage,
                "kv_blocks": group.engine.block_manager.num_total_blocks,
                "queued_demand_blocks": group.engine.scheduler.num_waiting_blocks,
                "running": len(group.engine.scheduler.running),
            }
            for group in list(self.groups)
        ]
        return {
            "overload_policy": self.config.overload_policy,
            "replicas": replicas,
            "groups": groups,
            "transitions": [asdict(t) for t in list(self.history)],  # a copy: the coordinator thread appends
        }


def _fail_loops(loops: list[AsyncEngine], error: Exception, kind: str) -> None:
    """A transition that failed halfway leaves its members' devices in no state to serve:
    their loops stop, and every request they hold ends with the error."""
    logger.error("%s failed halfway (%r): failing the members' requests", kind, error)
    for loop in loops:
        loop.fail(error)

