"""Live migration of a running request between two replicas (worker processes, gloo): its
KV arrives bit for bit, its tokens are those of an unloaded run, both replicas' blocks are
all free afterwards, and a migration whose request moved on meanwhile is called off."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from kunserve import LLM, EngineConfig, SamplingParams
from kunserve.cluster import migration
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.runner import Transition
from kunserve.engine.llm_engine import LLMEngine
from kunserve.worker.protocol import DeviceCalls

pytestmark = pytest.mark.slow  # migrations between worker processes

MAX_MODEL_LEN = 256
PROMPTS = [[(5 * i + 17 * j) % 500 for j in range(8 + 9 * (i % 7))] for i in range(6)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
STEPS_BEFORE = 5  # decode a little at the source first, so the request has full blocks and a partial one


@dataclass
class Migrated:
    transition: Transition | None
    source_digests: list[str]
    destination_digests: list[str]
    tokens: list[list[int]]
    expected: list[list[int]]
    free_blocks: list[tuple[int, int]]  # per replica (free, total) afterwards


def _run_to_end(engines: list[LLMEngine]) -> dict[str, list[int]]:
    finished: dict[str, list[int]] = {}
    while any(e.has_unfinished_requests() for e in engines):
        for engine in engines:
            if engine.has_unfinished_requests():
                finished.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    return finished


@pytest.fixture(scope="module")
def migrated(llama_dir: Path) -> Migrated:
    expected = [o.outputs[0].token_ids for o in
                LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN).generate(PROMPTS, GREEDY, use_tqdm=False)]
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=64, worker_threads=1)
    cluster = Cluster.launch(config, num_replicas=2, coordinator=CoordinatorConfig("migrate"))
    try:
        source, destination = cluster.engines
        for i, prompt in enumerate(PROMPTS):
            source.add_request(str(i), prompt, GREEDY)
        for _ in range(STEPS_BEFORE):
            source.step()
        seq = source.scheduler.running[-1]
        source_digests = source.executor.call(0, DeviceCalls.kv_digests, list(seq.block_ids))
        transition = cluster.coordinator.runner.migrate(seq, 0, 1)
        destination_digests = destination.executor.call(0, DeviceCalls.kv_digests, list(seq.block_ids))
        finished = _run_to_end(cluster.engines)
        free = [(e.block_manager.num_free_blocks, e.block_manager.num_total_blocks) for e in cluster.engines]
    finally:
        cluster.shutdown()
    return Migrated(transition, source_digests, destination_digests, [finished[str(i)] for i in range(len(PROMPTS))],
                    expected, free)


def test_the_migrated_kv_arrives_bit_for_bit(migrated: Migrated) -> None:
    assert migrated.transition is not None and migrated.transition.kind == "migrate"
    assert len(migrated.source_digests) > 1 and migrated.destination_digests == migrated.source_digests


def test_every_request_keeps_the_tokens_of_an_unloaded_run(migrated: Migrated) -> None:
    assert migrated.tokens == migrated.expected


def test_both_replicas_free_every_block_afterwards(migrated: Migrated) -> None:
    assert all(free == total for free, total in migrated.free_blocks)


def test_a_migration_is_called_off_when_its_request_finished_meanwhile(llama_dir: Path) -> None:
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=64, worker_threads=1)
    cluster = Cluster.launch(config, num_replicas=2, coordinator=CoordinatorConfig("migrate"))
    try:
        source, destination = cluster.engines
        source.add_request("r", PROMPTS[3], GREEDY)
        source.step()
        seq = source.scheduler.running[0]
        source.abort_request("r")
        assert migration.migrate(cluster, seq, 0, 1) is None
        assert destination.block_manager.num_free_blocks == destination.block_manager.num_total_blocks
    finally:
        cluster.shutdown()
