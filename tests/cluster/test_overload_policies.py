"""The four overload policies in the same engine, under the same seeded burst on two
KV-starved replicas: each keeps every request's greedy tokens equal to an unloaded run, and
each meets the overload its own way (recompute preempts, swap moves KV to host memory,
migrate moves running requests to the lighter replica, kunserve drops and restores)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from kunserve import LLM, EngineConfig, RequestOutput, SamplingParams
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.policies.registry import OVERLOAD_POLICIES
from kunserve.engine.async_engine import RequestStream
from kunserve.sampling_params import RequestOutputKind

pytestmark = pytest.mark.slow  # every overload policy on a cluster of worker processes

MAX_MODEL_LEN = 256
NUM_REQUESTS = 16
PROMPT = [(17 * j) % 500 for j in range(8)] * 5
# Round-robin sends the even requests (long outputs) to replica 0 and the odd (short) to
# replica 1, so replica 1 runs dry while replica 0 is still overloaded: room to migrate to.
LONG_OUTPUT, SHORT_OUTPUT = 80, 8


def _params(i: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=LONG_OUTPUT if i % 2 == 0 else SHORT_OUTPUT, ignore_eos=True,
                          output_kind=RequestOutputKind.FINAL_ONLY)


def _prompt(i: int) -> list[int]:
    return [(t + 7 * i) % 500 for t in PROMPT]


@dataclass
class PolicyRun:
    tokens: list[list[int]]
    preemptions: int
    swap_outs: int
    transitions: list[str]
    steps_ahead: int  # the replicas' steps scheduled while the one before was in flight


def run_policy(llama_dir: Path, policy: str, async_scheduling: str = "off") -> PolicyRun:
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=12, max_num_seqs=16,
                          max_num_batched_tokens=64, worker_threads=1, async_scheduling=async_scheduling)
    coordinator = CoordinatorConfig(policy, check_interval_s=0.01, drop_after_s=0.02, restore_after_s=0.2)
    cluster = Cluster.launch(config, num_replicas=2, dispatch_policy="round_robin", coordinator=coordinator)

    async def final(stream: RequestStream) -> RequestOutput:
        return [out async for out in stream][-1]

    async def run() -> list[RequestOutput]:
        cluster.start(asyncio.get_running_loop())
        streams = [cluster.add_requests([f"r{i}"], [_prompt(i)], [_params(i)]) for i in range(NUM_REQUESTS)]
        outputs = [await final(stream) for stream in streams]
        while cluster.coordinator.runner.groups:  # let a restore happen
            await asyncio.sleep(0.01)
        return outputs

    try:
        outputs = asyncio.run(run())
        schedulers = [engine.scheduler for engine in cluster.engines]
        return PolicyRun([o.outputs[0].token_ids for o in outputs], sum(s.num_preemptions for s in schedulers),
                         sum(s.num_swap_outs for s in schedulers), [t.kind for t in cluster.coordinator.runner.history],
                         sum(s.num_steps_ahead for s in schedulers))
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def unloaded(llama_dir: Path) -> list[list[int]]:
    llm = LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=256)
    outputs = llm.generate([_prompt(i) for i in range(NUM_REQUESTS)], [_params(i) for i in range(NUM_REQUESTS)],
                           use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def runs(llama_dir: Path) -> dict[str, PolicyRun]:
    return {policy: run_policy(llama_dir, policy) for policy in OVERLOAD_POLICIES}


@pytest.mark.parametrize("policy", OVERLOAD_POLICIES)
def test_every_policy_keeps_the_tokens_of_an_unloaded_run(runs: dict[str, PolicyRun], unloaded: list[list[int]],
                                                          policy: str) -> None:
    assert runs[policy].tokens == unloaded


def test_recompute_preempts_and_transitions_nothing(runs: dict[str, PolicyRun]) -> None:
    assert runs["recompute"].preemptions > 0 and runs["recompute"].swap_outs == 0 and not runs["recompute"].transitions


def test_swap_keeps_preempted_kv_in_host_memory(runs: dict[str, PolicyRun]) -> None:
    assert runs["swap"].swap_outs > 0 and not runs["swap"].transitions


def test_migrate_moves_running_requests_to_the_lighter_replica(runs: dict[str, PolicyRun]) -> None:
    assert "migrate" in runs["migrate"].transitions and {"drop", "restore"}.isdisjoint(runs["migrate"].transitions)


def test_kunserve_drops_and_restores(runs: dict[str, PolicyRun]) -> None:
    assert runs["kunserve"].transitions[:2] == ["drop", "restore"]


@pytest.fixture(scope="module")
def runs_ahead(llama_dir: Path) -> dict[str, PolicyRun]:
    """The policies that move requests between devices, with the replicas scheduling ahead
    (asynchronous scheduling, which "auto" leaves off on CPU)."""
    return {policy: run_policy(llama_dir, policy, async_scheduling="on") for policy in ("kunserve", "migrate")}


@pytest.mark.parametrize(("policy", "transition"), [("kunserve", "drop"), ("migrate", "migrate")])
def test_replicas_scheduling_ahead_keep_the_tokens_through_transitions(
    runs_ahead: dict[str, PolicyRun], unloaded: list[list[int]], policy: str, transition: str
) -> None:
    run = runs_ahead[policy]
    assert run.steps_ahead > 0 and transition in run.transitions
    assert run.tokens == unloaded
