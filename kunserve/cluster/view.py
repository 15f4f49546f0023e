"""What the control plane needs of a cluster, and of each replica's loop: the live cluster
(kunserve/cluster/cluster.py, a thread per replica) and the simulated one
(kunserve/sim/cluster.py, discrete events) both provide it, so the same policies and
transitions run on either."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from typing_extensions import Self

from kunserve.cluster.links import Links
from kunserve.engine.llm_engine import Clock, LLMEngine
from kunserve.outputs import RequestOutput


class ReplicaLoop(Protocol):
    """One replica's loop: it runs an engine's steps, and a transition holds it between steps."""

    @property
    def engine(self) -> LLMEngine:
        """The engine this loop steps now (its replica's own, or its group's)."""
        ...

    @property
    def is_alive(self) -> bool: ...

    def pause(self) -> None:
        """Hold the loop between steps, with no step in flight, until `resume`."""

    def resume(self) -> None: ...

    def run_engine(self, engine: LLMEngine) -> None:
        """While paused: step `engine` from now on (a group's after a drop, its own after a restore)."""

    def merge_into(self, owner: Self) -> None:
        """While paused: the owner's loop runs this replica's requests (it joined a group)."""

    def unmerge(self) -> None: ...

    def fail(self, error: BaseException) -> None:
        """Stop serving: every request the loop holds ends with `error`."""

    def deliver_from_thread(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs produced off the loop (by a transition) to their requests."""


class ClusterView(Protocol):
    """Replicas, their loops and the links between their devices, as the control plane sees them."""

    @property
    def engines(self) -> Sequence[LLMEngine]:
        """Each replica's own engine (a group runs its members' requests on its own engine)."""
        ...

    @property
    def replicas(self) -> Sequence[ReplicaLoop]: ...

    @property
    def links(self) -> Links: ...

    @property
    def clock(self) -> Clock:
        """What overloads are timed by."""
        ...

    @property
    def wall_clock(self) -> Clock:
        """What transitions are stamped with."""
        ...

    def run_together(self, transitions: list[Callable[[], object]]) -> None:
        """Run transitions of disjoint replicas side by side."""
