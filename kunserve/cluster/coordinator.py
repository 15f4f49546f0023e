"""The coordinator: every `check_interval_s` the cluster's overload policy
(kunserve/cluster/policies/) looks at the replicas and acts through the transition runner
(kunserve/cluster/runner.py), on a thread of its own beside the replicas' loops."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kunserve.cluster import status
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.policies.registry import policy_class
from kunserve.cluster.runner import Transition, TransitionRunner
from kunserve.cluster.view import ClusterView
from kunserve.engine.async_engine import STOP_GRACE_S

logger = logging.getLogger(__name__)


class Coordinator:
    def __init__(
        self, cluster: ClusterView, config: CoordinatorConfig,
        on_transition: Callable[[Transition], None] | None = None,
    ) -> None:
        self.cluster = cluster
        self.config = config
        self.runner = TransitionRunner(cluster, config.max_group_size, on_transition, config.overlap_exchange)
        self.policy = policy_class(config.overload_policy)(config, cluster, self.runner)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.policy.watches():
            return
        self._thread = threading.Thread(target=self._watch, name="kunserve-coordinator", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Stop checking, without waiting for a check under way."""
        self._stop.set()

    def stop(self) -> None:
        """Stop checking and wait for a check under way, a bounded time: its transition ends
        within its devices' deadlines, at once when they are stopped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_GRACE_S)
            if self._thread.is_alive():
                logger.warning("the coordinator's check did not end within %.0f s; leaving it", STOP_GRACE_S)

    def _watch(self) -> None:
        while not self._stop.wait(self.config.check_interval_s):
            try:
                self.check(self.cluster.clock())
            except Exception:
                logger.exception("coordinator check failed; will look again")

    def check(self, now: float) -> None:
        """One look at the cluster: the policy acts where it says so."""
        self.policy.check(now)

    def is_idle(self) -> bool:
        """Whether a check now would change nothing (a simulation skips its checks then)."""
        return self.policy.is_idle()

    def describe(self) -> dict:
        return status.describe(self.runner, self.config.overload_policy)
