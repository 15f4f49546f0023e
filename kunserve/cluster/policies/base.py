"""The interface of an overload policy: what a cluster does when a replica's KV memory
runs out. The engines preempt on their own (by the policy's `preemption_mode`); a policy that
acts on the cluster (drops, migrations) does so at the coordinator's checks, through the
transition runner. Policies are found by name in registry.py."""

from __future__ import annotations

from abc import ABC
from typing import ClassVar

from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.runner import TransitionRunner
from kunserve.cluster.view import ClusterView
from kunserve.engine.llm_engine import LLMEngine


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


class OverloadTimer:
    """Since when each replica has been overloaded, so a policy acts only on overloads that last."""

    def __init__(self, lasting_s: float) -> None:
        self.lasting_s = lasting_s
        self._since: dict[int, float] = {}

    def update(self, now: float, engines: dict[int, LLMEngine]) -> set[int]:
        """Look at these replicas (by index; the others are forgotten); returns those whose
        overload has lasted `lasting_s`."""
        self._since = {i: self._since.get(i, now) for i, engine in engines.items() if deficit(engine) > 0}
        return {i for i, since in self._since.items() if now - since >= self.lasting_s}

    @property
    def timing(self) -> bool:
        """Whether some overload is being timed."""
        return bool(self._since)
