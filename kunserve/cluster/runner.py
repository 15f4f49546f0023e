"""Carrying transitions out on a cluster while requests keep arriving: drops (fuse replicas
into a pipeline group), restores (split it back) and migrations, each holding only its own
replicas, so transitions of disjoint replicas run side by side (`ClusterView.run_together`).

A transition pauses its replicas' loops between steps, runs kunserve/cluster/transitions.py
(or migration.py), and points the loops at the group engine (or back). The groups it made
and the transitions it ran are this module's state; when to act is a policy's choice
(kunserve/cluster/policies/).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from kunserve.cluster import migration
from kunserve.cluster.exchange import layer_sized_chunk
from kunserve.cluster.growth import grow, shrink
from kunserve.cluster.planner import group_sizes
from kunserve.cluster.transitions import SplitRefused, TransitionStats, fuse, split
from kunserve.cluster.view import ClusterView, ReplicaLoop
from kunserve.engine.llm_engine import LLMEngine
from kunserve.engine.sequence import Sequence

logger = logging.getLogger(__name__)

HISTORY_LENGTH = 32  # transitions kept for GET /v1/cluster


class TransitionConflict(ValueError):
    """A transition the cluster's state refuses now, not the request itself: its replicas are
    grouped, down or held by another transition, or there is no such group (the server's 409)."""


@dataclass
class Group:
    members: list[int]  # replica indices; member r is stage r
    engine: LLMEngine
    formed_at: float  # the cluster's clock


@dataclass
class Transition:
    kind: str  # "drop" | "grow" | "shrink" | "restore" | "migrate" | "restart" (replicas whose workers failed, on new ones)
    members: list[int]  # a group's replicas; a migration's (source, destination)
    at: float  # the cluster's wall clock (time.time() on a live cluster)
    duration_s: float
    exchange_s: float  # KV moved between devices
    sub_blocks_moved: int
    reason: str
    pause_s: float  # how long the requests involved could not run


class TransitionRunner:
    def __init__(
        self, cluster: ClusterView, max_group_size: int | None = None,
        on_transition: Callable[[Transition], None] | None = None, overlap_exchange: bool = False,
    ) -> None:
        """`max_group_size`: the largest group a drop may form (None: any that divides the layers);
        `overlap_exchange`: a drop's group starts at once and moves the running requests' KV
        between its steps, a layer's worth at a time (kunserve/cluster/exchange.py)."""
        self.cluster = cluster
        self.max_group_size = max_group_size
        self.overlap_exchange = overlap_exchange
        self.on_transition = on_transition
        self.groups: list[Group] = []
        self.history: deque[Transition] = deque(maxlen=HISTORY_LENGTH)
        self.restarts: Counter[int] = Counter()  # by replica: how often its workers were replaced
        # The groups and the replicas a transition holds; notified when a transition lets go.
        self._state = threading.Condition()
        self._held: set[int] = set()  # replicas a transition is under way on

    # ---- which replica runs what -----------------------------------------------------------------

    def replicas_in_replica_mode(self) -> list[int]:
        grouped = {m for group in self.groups for m in group.members}
        return [i for i, r in enumerate(self.cluster.replicas) if i not in grouped and r.is_alive]

    def group_of(self, replica: int) -> Group | None:
        return next((group for group in self.groups if replica in group.members), None)

    def engine_of(self, replica: int) -> LLMEngine:
        """The engine running the replica's requests now: its own, or its group's."""
        group = self.group_of(replica)
        return self.cluster.engines[replica] if group is None else group.engine

    def group_sizes(self, num_replicas: int) -> list[int]:
        """Sizes a group of these many replicas may have."""
        return group_sizes(self.cluster.engines[0].spec.num_layers, num_replicas, self.max_group_size)

    def default_drop_members(self) -> list[int]:
        """The replicas a drop takes when an operator names none: the largest group the
        replicas in replica mode allow."""
        free = self.replicas_in_replica_mode()
        sizes = self.group_sizes(len(free))
        if not sizes:
            raise TransitionConflict(f"replicas: the {len(free)} replica(s) in replica mode can form no group")
        return free[: sizes[-1]]

    def hold(self, replicas: list[int], wait_s: float = 0.0) -> bool:
        """Hold these replicas for one transition once no other holds any of them, waiting up to
        `wait_s` (transitions end within their devices' deadlines); False if still held then."""
        with self._state:
            if not self._state.wait_for(lambda: not self._held & set(replicas), wait_s):
                return False
            self._held.update(replicas)
            return True

    def release(self, replicas: list[int]) -> None:
        with self._state:
            self._held.difference_update(replicas)
            self._state.notify_all()

    @contextlib.contextmanager
    def holding(self, replicas: list[int]) -> Iterator[None]:
        """Hold these replicas for one transition; refused (TransitionConflict) while another holds any."""
        if not self.hold(replicas):
            raise TransitionConflict(f"replicas: {sorted(self._held & set(replicas))} are in another transition")
        try:
            yield
        finally:
            self.release(replicas)

    def is_held(self, replica: int) -> bool:
        return replica in self._held

    # ---- transitions -----------------------------------------------------------------------------

    def drop(self, members: list[int], reason: str = "requested") -> Transition:
        """Fuse these replicas (member r becomes stage r) into a pipeline group."""
        with self.holding(members):
            self._check_drop(members)
            cluster = self.cluster
            loops = [cluster.replicas[i] for i in members]
            paused_at = cluster.clock()
            pause_together(loops)
            try:
                _check_serving(members, loops)
            except ValueError:
                for loop in loops:
                    loop.resume()
                raise
            try:
                cluster.links.open({i: cluster.engines[i].executor for i in members})
                engines = [cluster.engines[i] for i in members]
                chunk = layer_sized_chunk(engines[0].executor.layout, len(members)) if self.overlap_exchange else None
                group_engine, stats = fuse(engines, chunk)
                _run_group(loops, group_engine)
            except Exception as error:
                _fail_loops(loops, error, "drop")
                raise
            finally:
                for loop in loops:
                    loop.resume()
            with self._state:
                self.groups.append(Group(members, group_engine, cluster.clock()))
            return self._record("drop", members, stats, reason, cluster.clock() - paused_at)

    def _check_drop(self, members: list[int]) -> None:
        """Refuse a drop no group can be made of (ValueError; TransitionConflict where the replicas'
        state is why), before any device is touched."""
        free = self.replicas_in_replica_mode()
        if len(members) < 2 or len(set(members)) != len(members):
            raise ValueError(f"replicas: {members} must be two or more distinct replicas in replica mode {free}")
        if not set(members) <= set(free):
            raise TransitionConflict(f"replicas: {sorted(set(members) - set(free))} are not in replica mode now "
                                     f"(in replica mode: {free})")
        num_layers = self.cluster.engines[members[0]].spec.num_layers
        if num_layers % len(members):
            sizes = group_sizes(num_layers, len(free), None)
            raise ValueError(f"replicas: a group of {len(members)} must divide the model's {num_layers} layers "
                             f"(each stage holds L/g of them); possible sizes here: {sizes}")

    def grow(self, groups: list[Group], members: list[int], reason: str = "requested") -> Transition:
        """Grow `groups[0]` into a group of `members`, in stage order: k units of its size,
        stage k·r + u being unit u's r-th member, unit 0 the group, each other unit another
        of `groups` or replicas in replica mode that join (kunserve/cluster/growth.py)."""
        with self.holding(members):
            self._check_growth(groups, members)
            cluster = self.cluster
            loops = [cluster.replicas[i] for i in members]
            owner = cluster.replicas[groups[0].members[0]]  # it runs the grown group as it ran the first
            # The loops that step: each group's owner, and the joining replicas'.
            stepping = [m for m in members if (group := self.group_of(m)) is None or group.members[0] == m]
            paused_at = cluster.clock()
            pause_together(loops)
            try:
                _check_serving(stepping, [cluster.replicas[i] for i in stepping])
            except ValueError:
                for loop in loops:
                    loop.resume()
                raise
            try:
                cluster.links.open({i: cluster.engines[i].executor for i in members})
                engine, outputs, stats = grow([group.engine for group in groups], [cluster.engines[i] for i in members])
                owner.run_engine(engine)
                for i in members[1:]:
                    cluster.replicas[i].run_engine(cluster.engines[i])  # a group's owner until now
                    cluster.replicas[i].merge_into(owner)
                owner.deliver_from_thread(outputs)
            except Exception as error:
                _fail_loops(loops, error, "grow")
                with self._state:
                    for group in groups:
                        self.groups.remove(group)
                raise
            finally:
                for loop in loops:
                    loop.resume()
            with self._state:
                for group in groups:
                    self.groups.remove(group)
                self.groups.append(Group(list(members), engine, cluster.clock()))
            return self._record("grow", members, stats, reason, cluster.clock() - paused_at)

    def _check_growth(self, groups: list[Group], members: list[int]) -> None:
        """Refuse (ValueError) a growth no group can be made of, before any device is touched."""
        g, size = len(groups[0].members), len(members)
        k = size // g
        free = self.replicas_in_replica_mode()
        if any(group not in self.groups for group in groups):
            raise TransitionConflict(f"groups: {[group.members for group in groups]} are not all groups now")
        grouped = {m for group in groups for m in group.members}
        joining = [m for m in members if m not in grouped]
        if not set(joining) <= set(free) or len(set(members)) != size or not grouped <= set(members):
            raise ValueError(f"replicas: {members} must be the groups' members and distinct replicas in replica "
                             f"mode {free}")
        units = [members[u::k] for u in range(k)] if k else []
        if size % g or k < 2 or units[0] != groups[0].members or any(
                group.members not in units for group in groups):
            raise ValueError(f"replicas: groups of {g} grow by a factor k >= 2 into stages where stage k·r + u is "
                             f"unit u's r-th member; got {members} for groups {[group.members for group in groups]}")
        num_layers = self.cluster.engines[members[0]].spec.num_layers
        if num_layers % size:
            raise ValueError(f"replicas: a group of {size} must divide the model's {num_layers} layers")

    def shrink(self, group: Group, factor: int = 2, reason: str = "requested") -> Transition:
        """Shrink `group` by `factor`: its members at stages 0, k, 2k, ... form the kept group,
        the others leave as replicas (kunserve/cluster/growth.py). SplitRefused when they
        cannot take the requests' KV now: the group then serves on as it was."""
        cluster = self.cluster
        with self.holding(group.members):
            if group not in self.groups:
                raise TransitionConflict(f"group: {group.members} is not a group now")
            loops = [cluster.replicas[i] for i in group.members]
            paused_at = cluster.clock()
            for loop in loops:
                loop.pause()
            try:
                _check_serving(group.members[:1], loops[:1])
                engine, outputs, stats = shrink(group.engine, [cluster.engines[i] for i in group.members], factor)
                loops[0].run_engine(engine)
                for s, loop in enumerate(loops):
                    if s % factor:
                        loop.unmerge()
                loops[0].deliver_from_thread(outputs)
            except SplitRefused as refused:
                loops[0].deliver_from_thread(refused.outputs)  # the group serves on
                raise
            except ValueError:
                raise  # refused before any device was touched
            except Exception as error:
                _fail_loops(loops, error, "shrink")
                with self._state:
                    self.groups.remove(group)
                raise
            finally:
                for loop in loops:
                    loop.resume()
            kept = group.members[::factor]
            with self._state:
                self.groups.remove(group)
                self.groups.append(Group(kept, engine, cluster.clock()))
            return self._record("shrink", group.members, stats, reason, cluster.clock() - paused_at)

    def restore(self, group_index: int = 0, reason: str = "requested") -> Transition:
        """Split a group back into its replicas."""
        if not self.groups:
            raise TransitionConflict("group: there is no pipeline group to restore (a group restores itself once its "
                                     "demand fits its replicas for --restore-after-s)")
        if not 0 <= group_index < len(self.groups):
            raise TransitionConflict(f"group: {group_index} is not one of the {len(self.groups)} groups")
        return self.restore_group(self.groups[group_index], reason)

    def restore_group(self, group: Group, reason: str) -> Transition:
        cluster = self.cluster
        with self.holding(group.members):
            if group not in self.groups:
                raise TransitionConflict(f"replicas: the group of {group.members} is gone (its workers failed)")
            loops = [cluster.replicas[i] for i in group.members]
            paused_at = cluster.clock()
            for loop in loops:
                loop.pause()
            try:
                _check_serving(group.members[:1], loops[:1])
                outputs, stats = split(group.engine, [cluster.engines[i] for i in group.members])
                loops[0].run_engine(cluster.engines[group.members[0]])
                for loop in loops[1:]:
                    loop.unmerge()
                loops[0].deliver_from_thread(outputs)
            except SplitRefused as refused:
                loops[0].deliver_from_thread(refused.outputs)  # the group serves on
                raise
            except ValueError:
                raise  # refused before any device was touched
            except Exception as error:
                _fail_loops(loops, error, "restore")
                with self._state:
                    self.groups.remove(group)
                raise
            finally:
                for loop in loops:
                    loop.resume()
            with self._state:
                self.groups.remove(group)
            return self._record("restore", group.members, stats, reason, cluster.clock() - paused_at)

    def migrate(self, seq: Sequence, src: int, dst: int, reason: str = "requested") -> Transition | None:
        """Move running `seq` from replica `src` to `dst` (kunserve/cluster/migration.py);
        None when it was called off (the request moved on meanwhile)."""
        cluster = self.cluster
        with self.holding([src, dst]):
            _check_serving([src, dst], [cluster.replicas[src], cluster.replicas[dst]])
            if not cluster.links.are_open(src, dst):
                pair = [cluster.replicas[i] for i in sorted((src, dst))]
                pause_together(pair)
                try:
                    cluster.links.open({i: cluster.engines[i].executor for i in (src, dst)})
                finally:
                    for loop in pair:
                        loop.resume()
            stats = migration.migrate(cluster, seq, src, dst)
            if stats is None:
                return None
            transition = Transition("migrate", [src, dst], cluster.wall_clock(), stats.duration_s, stats.pause_s,
                                    stats.blocks_moved, f"{reason}; request {stats.request_id}", stats.pause_s)
            return self._log(transition)

    def dissolve(self, group: Group) -> None:
        """Forget a group whose workers failed (its members restart as replicas); the caller
        holds its members."""
        with self._state:
            if group in self.groups:
                self.groups.remove(group)

    def record_restart(self, members: list[int], reason: str, duration_s: float) -> Transition:
        """Note that these replicas run on new workers now, `duration_s` after they failed."""
        with self._state:
            self.restarts.update(members)
        return self._log(Transition("restart", list(members), self.cluster.wall_clock(), duration_s, 0.0, 0,
                                    reason, duration_s))

    def _record(self, kind: str, members: list[int], stats: TransitionStats, reason: str, pause_s: float
                ) -> Transition:
        """`pause_s`: how long the members' loops were held (their running steps ending, links
        opening, the transition itself): their requests' stall."""
        return self._log(Transition(kind, list(members), self.cluster.wall_clock(), stats.duration_s,
                                    stats.exchange_s, stats.sub_blocks_moved, reason, pause_s))

    def _log(self, transition: Transition) -> Transition:
        self.history.append(transition)
        logger.info("transition %s", asdict(transition))
        if self.on_transition is not None:
            self.on_transition(transition)
        return transition


def pause_together(loops: list[ReplicaLoop]) -> None:
    """Pause these loops, each first alone (paused and resumed), so that no loop is held while
    another's step runs on: a hung worker's step lasts until its deadline, and the requests of
    the loops paused before it would stall as long."""
    for loop in loops:
        loop.pause()
        loop.resume()
    for loop in loops:
        loop.pause()


def _run_group(loops: list[ReplicaLoop], group_engine: LLMEngine) -> None:
    """The first member's loop steps the group; the others pass their requests to it."""
    owner = loops[0]
    owner.run_engine(group_engine)
    for loop in loops[1:]:
        loop.merge_into(owner)


def _check_serving(replicas: list[int], loops: list[ReplicaLoop]) -> None:
    """Refuse (TransitionConflict) a transition on replicas that went down meanwhile (they restart)."""
    down = [i for i, loop in zip(replicas, loops) if not loop.is_alive]
    if down:
        raise TransitionConflict(f"replicas: {down} are not serving (their workers failed; they restart)")


def _fail_loops(loops: list[ReplicaLoop], error: Exception, kind: str) -> None:
    """A transition that failed halfway leaves its members' devices in no state to serve:
    their loops stop, and every request they hold ends with the error."""
    logger.error("%s failed halfway (%r): failing the members' requests", kind, error)
    for loop in loops:
        loop.fail(error)
