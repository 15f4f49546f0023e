"""Which replica gets a request. Decided from numbers alone (each replica's KV load, or None
for a replica that is down), so real, multiprocess and simulated clusters share it."""

from __future__ import annotations

from collections.abc import Sequence

DISPATCH_POLICIES = ("round_robin", "least_loaded")


class NoReplicaError(RuntimeError):
    """Every replica is down."""


class Dispatcher:
    def __init__(self, policy: str = "least_loaded") -> None:
        if policy not in DISPATCH_POLICIES:
            raise ValueError(f"dispatch_policy: expected one of {DISPATCH_POLICIES}, got {policy!r}")
        self.policy = policy
        self._next = 0  # round-robin cursor; also breaks least-loaded ties in turn

    def choose(self, loads: Sequence[float | None]) -> int:
        """The replica for the next request. `loads[i]`: replica i's KV demand (used blocks
        plus the blocks its waiting requests will need) as a fraction of its blocks, so a
        pipeline group, which has more, takes its share; None when it is down."""
        n = len(loads)
        order = [(self._next + k) % n for k in range(n)]
        alive = [i for i in order if loads[i] is not None]
        if not alive:
            raise NoReplicaError("no replica is serving")
        chosen = alive[0] if self.policy == "round_robin" else min(alive, key=lambda i: loads[i] or 0.0)
        self._next = (chosen + 1) % n
        return chosen
