"""The interface of an overload policy: what a cluster does when a replica's KV memory
runs out. The engines preempt on their own (by the policy's `preemption_mode`); a policy that
acts on the cluster (drops, migrations) does so at the coordinator's checks, through the
transition runner. Policies are found by name in registry.py."""

from __future__ import annotations

import weakref
from abc import ABC
from typing import ClassVar

from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.runner import TransitionRunner
from kunserve.cluster.view import ClusterView
from kunserve.engine.llm_engine import LLMEngine
from kunserve.engine.scheduler import Scheduler


class OverloadPolicy(ABC):
    name: ClassVar[str]  # what --overload-policy calls it
    preemption_mode: ClassVar[str] = "recompute"  # EngineConfig.preemption_mode of the engines under it

    def __init__(self, config: CoordinatorConfig, cluster: ClusterView, runner: TransitionRunner) -> None:
        self.config = config
        self.cluster = cluster
        self.runner = runner

    def watches(self) -> bool:
        """Whether it acts on the cluster at all (the coordinator then checks periodically)."""
        return False

    def check(self, now: float) -> None:
        """One look at the cluster at time `now`: act where the policy says so."""

    def is_idle(self) -> bool:
        """Whether a check now would change nothing (a simulation skips its checks then)."""
        return True


def deficit(engine: LLMEngine) -> int:
    """Blocks the engine's queued requests need beyond its free blocks (> 0: overloaded)."""
    return engine.scheduler.num_waiting_blocks - engine.block_manager.num_free_blocks


class WaitWatch:
    """Why each engine's queued requests have waited since the last look: the reason most of
    its steps since then stopped admitting for (kunserve/engine/scheduler.py: KV_BLOCKS,
    SEQ_SLOTS, TOKEN_BUDGET), or the last step's when none ran; None when nothing waits."""

    def __init__(self) -> None:
        self._seen: weakref.WeakKeyDictionary[Scheduler, dict[str, int]] = weakref.WeakKeyDictionary()

    def reason(self, engine: LLMEngine) -> str | None:
        scheduler = engine.scheduler
        counts = dict(scheduler.stalls)  # a copy: the engine's thread counts on
        before = self._seen.get(scheduler, dict.fromkeys(counts, 0))
        self._seen[scheduler] = counts
        if scheduler.last_stall is None:
            return None
        since = {reason: counts[reason] - before[reason] for reason in counts}
        if not any(since.values()):
            return scheduler.last_stall
        return max(since, key=lambda reason: (since[reason], reason == scheduler.last_stall))


class OverloadTimer:
    """Since when each replica (or group) has been overloaded, so a policy acts only on
    overloads that last."""

    def __init__(self, lasting_s: float) -> None:
        self.lasting_s = lasting_s
        self._since: dict[int, float] = {}

    def update(self, now: float, overloaded: dict[int, bool]) -> set[int]:
        """Whether each replica (by key) is overloaded now (the keys left out are forgotten);
        returns those whose overload has lasted `lasting_s`."""
        self._since = {key: self._since.get(key, now) for key, over in overloaded.items() if over}
        return {key for key, since in self._since.items() if now - since >= self.lasting_s}

    def lasted(self, key: int, now: float) -> float:
        """How long `key` has been overloaded (0: it is not)."""
        since = self._since.get(key)
        return 0.0 if since is None else now - since

    @property
    def timing(self) -> bool:
        """Whether some overload is being timed."""
        return bool(self._since)
