"""Overload policies plug in through one interface and a registry (kunserve/cluster/policies/).

Specified: a policy written in its own module and entered in the registry runs unchanged on a
cluster: the cluster's engines preempt as it says, the coordinator checks it, and what it
does goes through the same transitions as the built-in policies. Unknown names are refused."""

from __future__ import annotations

import pytest

from kunserve import EngineConfig, SamplingParams
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.policies import registry
from kunserve.cluster.policies.base import OverloadPolicy
from kunserve.sampling_params import RequestOutputKind
from kunserve.sim.cluster import SimulatedCluster


class DropOnAnyQueue(OverloadPolicy):
    """A toy policy, as a new module would hold it: fuse the first two free replicas as soon as
    any request waits, and never restore."""

    name = "drop-on-any-queue"
    preemption_mode = "swap"

    def watches(self) -> bool:
        return len(self.cluster.engines) > 1

    def check(self, now: float) -> None:
        free = self.runner.replicas_in_replica_mode()
        if len(free) >= 2 and any(self.cluster.engines[i].scheduler.waiting for i in free):
            self.runner.drop(free[:2], reason="a request waits")

    def is_idle(self) -> bool:
        return not any(engine.scheduler.waiting for engine in self.cluster.engines)


@pytest.fixture
def toy_policy(monkeypatch: pytest.MonkeyPatch) -> str:
    """The toy policy entered in the registry, as its one line there would."""
    monkeypatch.setitem(registry.POLICIES, DropOnAnyQueue.name, DropOnAnyQueue)
    return DropOnAnyQueue.name


def test_a_policy_entered_in_the_registry_runs_a_cluster_and_acts_through_the_transitions(toy_policy: str) -> None:
    config = EngineConfig(model="llama-3-8b", num_kv_blocks=12, max_num_seqs=16, max_model_len=256)
    cluster = SimulatedCluster(config, 2, CoordinatorConfig(toy_policy))
    cluster.open_all_links()
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
              for _ in range(12)]
    prompts = [[(17 * j + 7 * i) % 500 for j in range(40)] for i in range(12)]
    finished = cluster.run([0.0] * 12, prompts, params)
    assert len(finished) == 12 and not cluster.refused
    assert [t.kind for t in cluster.coordinator.runner.history] == ["drop"]
    assert all(engine.config.preemption_mode == "swap" for engine in cluster.engines)


def test_an_unknown_policy_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="overload_policy"):
        SimulatedCluster(EngineConfig(model="llama-3-8b", num_kv_blocks=12), 2, CoordinatorConfig("no-such-policy"))


def test_the_registry_names_every_built_in_policy() -> None:
    assert set(registry.OVERLOAD_POLICIES) == {"kunserve", "kunserve-swap", "recompute", "swap", "migrate"}
    assert all(registry.policy_class(name).name == name for name in registry.OVERLOAD_POLICIES)


@pytest.mark.parametrize(("policy", "mode"), [("kunserve", "auto"), ("kunserve-swap", "swap"), ("recompute", "recompute"),
                                              ("swap", "swap"), ("migrate", "recompute")])
def test_each_built_in_policys_engines_preempt_by_its_mode(policy: str, mode: str) -> None:
    cluster = SimulatedCluster(EngineConfig(model="llama-3-8b", num_kv_blocks=12), 2, CoordinatorConfig(policy))
    assert all(engine.config.preemption_mode == mode for engine in cluster.engines)


def test_kunserves_engines_choose_per_victim_between_swap_and_recompute() -> None:
    cluster = SimulatedCluster(EngineConfig(model="llama-3-8b", num_kv_blocks=12), 2, CoordinatorConfig("kunserve"))
    schedulers = [engine.scheduler for engine in cluster.engines]
    assert all(s.swap_pool is not None and s.swap_or_recompute is not None for s in schedulers)
