"""What the cluster looked like during a replay: periodic samples of the coordinator's view
(per replica KV usage, running and waiting requests, queued KV demand, mode) and its
transitions (drops, restores, and whatever other kinds a policy records), on one time axis
starting at the replay's start."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass

from kunserve.cluster.coordinator import Coordinator
from kunserve.cluster.runner import Transition

logger = logging.getLogger(__name__)

DEFAULT_TIMELINE_INTERVAL_S = 0.25
# The fields of each replica in Coordinator.describe() that a sample keeps.
REPLICA_FIELDS = ("replica", "mode", "kv_usage", "num_running", "num_waiting", "queued_demand_blocks")


@dataclass
class Clock:
    """One instant on both clocks: samples are timed by time.monotonic(), transitions by time.time()."""

    monotonic: float
    wall: float

    @classmethod
    def now(cls) -> Clock:
        return cls(time.monotonic(), time.time())


def sample(coordinator: Coordinator, start: Clock) -> dict | None:
    """One sample now (see `snapshot`), on the axis that starts at `start`."""
    return snapshot(coordinator, time.monotonic() - start.monotonic)


def snapshot(coordinator: Coordinator, t_s: float) -> dict | None:
    """The coordinator's view at `t_s`: each replica's REPLICA_FIELDS and the groups' members
    (a group's members all show the group's numbers). None if the view changed while it was
    read (describe() runs off the coordinator's thread, which may be recording a transition)."""
    try:
        view = coordinator.describe()
    except RuntimeError as error:  # "deque mutated during iteration": the next sample will do
        logger.debug("timeline sample skipped: %s", error)
        return None
    return {
        "t_s": t_s,
        "replicas": [{key: replica[key] for key in REPLICA_FIELDS} for replica in view["replicas"]],
        "groups": [group["members"] for group in view["groups"]],
    }


def waiting_in(taken: dict) -> int:
    """Requests waiting in the cluster at a sample, a group's counted once (its members all
    show the group's queue)."""
    grouped = {member for members in taken["groups"] for member in members}
    first_members = {members[0] for members in taken["groups"]}
    return sum(r["num_waiting"] for r in taken["replicas"]
               if r["replica"] not in grouped or r["replica"] in first_members)


def peak_waiting(samples: list[dict]) -> int:
    """The most requests waiting at once over the samples."""
    return max((waiting_in(taken) for taken in samples), default=0)


async def sample_until(
    coordinator: Coordinator, start: Clock, interval_s: float, stop: asyncio.Event, samples: list[dict]
) -> None:
    """Append a sample every `interval_s` until `stop` is set (and one more at the end)."""
    if not interval_s > 0:
        raise ValueError(f"timeline interval must be positive, got {interval_s}")
    while True:
        taken = sample(coordinator, start)
        if taken is not None:
            samples.append(taken)
        if stop.is_set():
            return
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except asyncio.TimeoutError:
            pass


class TransitionRecorder:
    """Every transition the coordinator makes from now on, through its `on_transition` hook
    (any hook already set is still called): its `history` keeps only the last few, and a
    policy that migrates request by request makes many."""

    def __init__(self, coordinator: Coordinator, start: Clock) -> None:
        self.start = start
        self._seen: list[Transition] = []  # appended on the coordinator's thread
        self._previous = coordinator.runner.on_transition
        coordinator.runner.on_transition = self._record

    def _record(self, transition: Transition) -> None:
        self._seen.append(transition)
        if self._previous is not None:
            self._previous(transition)

    def records(self) -> list[dict]:
        """The transitions so far, each with `end_s` and `start_s` on the timeline's axis (a
        transition is recorded when it ends, `duration_s` after it began)."""
        records = []
        for transition in list(self._seen):
            record = asdict(transition)
            record["end_s"] = transition.at - self.start.wall
            record["start_s"] = record["end_s"] - transition.duration_s
            records.append(record)
        return records
