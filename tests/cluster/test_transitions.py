"""Drop and restore across running requests, on gloo worker processes: two replicas of the
tiny Llama fuse into a 2-stage pipeline (releasing half their layers, exchanging the KV of
running requests), run, split back (gathering each request's KV on a home replica and
refilling the dropped weights from the peer), several times while requests run and queue.

Specified: every request ends with exactly the tokens of an
uninterrupted single-device run; none is lost; afterwards every block is free and every
device holds the original weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from engine_steps import run_steps

from kunserve import LLM, EngineConfig, LLMEngine, SamplingParams
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.transitions import SplitRefused, fuse, split
from kunserve.engine.staged_block_manager import StagedBlockManager
from kunserve.model.presets import resolve_model
from kunserve.sampling_params import RequestOutputKind
from kunserve.worker.protocol import DeviceCalls
from kunserve.worker.worker import build_worker

pytestmark = pytest.mark.slow  # drop and restore cycles on clusters of worker processes

MAX_MODEL_LEN = 256
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
# Seeded sampling: each request's random stream must survive moving between devices.
SEEDED = SamplingParams(temperature=1.0, seed=7, max_tokens=40, ignore_eos=True,
                        output_kind=RequestOutputKind.FINAL_ONLY)
# A full cache: FULL_REQUESTS prompts of FULL_PROMPT tokens take all FULL_BLOCKS blocks
# (12 blocks of 16 tokens each), more than the released layers give a stage as sub-blocks.
FULL_BLOCKS, FULL_REQUESTS, FULL_PROMPT = 96, 8, 190
SMALL_BLOCKS, SMALL_REQUEST_BLOCKS = 8, 5
PROMPTS = [[(7 * i + 13 * j) % 500 for j in range(n)] for i, n in enumerate((3, 19, 70, 130, 45, 8, 33, 90))]


def single_device(llama_dir: Path, params: SamplingParams) -> dict[str, list[int]]:
    llm = LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    return {f"r{i}": out.outputs[0].token_ids for i, out in enumerate(outputs)}


@pytest.fixture(scope="module")
def reference(llama_dir: Path) -> dict[str, list[int]]:
    return single_device(llama_dir, GREEDY)


@pytest.fixture(params=[2, 4], ids=["g2", "g4"])
def replicas(llama_dir: Path, request: pytest.FixtureRequest) -> Iterator[list[LLMEngine]]:
    # Few sequences per replica at a time, so some requests queue through the transitions.
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=96,
                          max_num_seqs=6 // request.param, max_num_batched_tokens=64, worker_threads=1)
    cluster = Cluster.launch(config, num_replicas=request.param)
    cluster.open_links()
    yield cluster.engines
    cluster.shutdown()


def run_through_cycles(replicas: list[LLMEngine], params: SamplingParams) -> dict[str, list[int]]:
    """Requests started on the replicas, then three drop → run → restore → run cycles."""
    for i, prompt in enumerate(PROMPTS):
        replicas[i % len(replicas)].add_request(f"r{i}", prompt, params)
    finished: dict[str, list[int]] = {}
    run_steps(replicas, 6, finished)
    for _ in range(3):
        group, _ = fuse(replicas)
        assert isinstance(group.block_manager, StagedBlockManager)
        run_steps([group], 8, finished)
        for out in split(group, replicas)[0]:
            finished[out.request_id] = out.outputs[0].token_ids
        run_steps(replicas, 4, finished)
    while any(engine.has_unfinished_requests() for engine in replicas):
        run_steps(replicas, 1, finished)
    return finished


def test_requests_keep_their_tokens_across_drop_and_restore_cycles(
    replicas: list[LLMEngine], reference: dict[str, list[int]]
) -> None:
    weights_before = [engine.executor.call(0, DeviceCalls.weight_digests) for engine in replicas]
    assert run_through_cycles(replicas, GREEDY) == reference
    for engine in replicas:
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
    assert [engine.executor.call(0, DeviceCalls.weight_digests) for engine in replicas] == weights_before


def test_seeded_requests_keep_their_random_streams_across_cycles(
    replicas: list[LLMEngine], llama_dir: Path
) -> None:
    assert run_through_cycles(replicas, SEEDED) == single_device(llama_dir, SEEDED)


@dataclass
class FullReplicas:
    replicas: list[LLMEngine]
    expected: list[list[int]]  # each request's tokens in an uninterrupted single-device run
    finished: dict[str, list[int]]

    def tokens(self) -> list[list[int]]:
        return [self.finished[f"r{i}"] for i in range(len(self.expected))]


@contextlib.contextmanager
def full_replicas(llama_dir: Path) -> Iterator[FullReplicas]:
    """Two replicas whose every block is in use: one step prefilled all their prompts."""
    prompts = [[(11 * i + 5 * j) % 500 for j in range(FULL_PROMPT)] for i in range(2 * FULL_REQUESTS)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    expected = [o.outputs[0].token_ids for o in LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN).generate(
        prompts, params, use_tqdm=False)]
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=FULL_BLOCKS,
                          max_num_seqs=FULL_REQUESTS, max_num_batched_tokens=FULL_REQUESTS * FULL_PROMPT,
                          worker_threads=1)
    cluster = Cluster.launch(config, num_replicas=2)
    try:
        cluster.open_links()
        replicas = cluster.engines
        for i, prompt in enumerate(prompts):
            replicas[i % 2].add_request(f"r{i}", prompt, params)
        full = FullReplicas(replicas, expected, {})
        run_steps(replicas, 1, full.finished)
        yield full
    finally:
        cluster.shutdown()


def test_a_drop_into_a_full_cache_exchanges_in_rounds_and_keeps_the_tokens(llama_dir: Path) -> None:
    with full_replicas(llama_dir) as full:
        assert [engine.block_manager.num_free_blocks for engine in full.replicas] == [0, 0]
        group, stats = fuse(full.replicas)
        assert stats.exchange_rounds > 1
        while group.has_unfinished_requests():
            run_steps([group], 1, full.finished)
        assert full.tokens() == full.expected


def test_a_restore_the_replicas_cannot_hold_is_refused_and_the_group_serves_on(llama_dir: Path) -> None:
    with full_replicas(llama_dir) as full:
        group, _ = fuse(full.replicas)
        # Grown past a block each: more KV than the two replicas' caches hold.
        while group.block_manager.num_total_blocks - group.block_manager.num_free_blocks <= 2 * FULL_BLOCKS:
            run_steps([group], 1, full.finished)
        with pytest.raises(SplitRefused, match="split:"):
            split(group, full.replicas)
        while group.has_unfinished_requests():
            run_steps([group], 1, full.finished)
        assert full.tokens() == full.expected


def test_a_refused_restore_leaves_no_block_taken_once_the_requests_finish(llama_dir: Path) -> None:
    # Replicas of SMALL_BLOCKS blocks each; the group runs three requests of SMALL_REQUEST_BLOCKS
    # blocks, more than one replica can take home, while the dropped layers' sub-blocks are free.
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=SMALL_BLOCKS,
                          max_num_batched_tokens=MAX_MODEL_LEN, worker_threads=1)
    cluster = Cluster.launch(config, num_replicas=2)
    try:
        cluster.open_links()
        group, _ = fuse(cluster.engines)
        prompt_len = SMALL_REQUEST_BLOCKS * config.block_size - 1
        for i in range(3):
            group.add_request(f"r{i}", [(5 * i + j) % 500 for j in range(prompt_len)], GREEDY)
        finished: dict[str, list[int]] = {}
        run_steps([group], 1, finished)
        with pytest.raises(SplitRefused):
            split(group, cluster.engines)
        while group.has_unfinished_requests():
            run_steps([group], 1, finished)
        assert group.block_manager.num_free_blocks == group.block_manager.num_total_blocks
    finally:
        cluster.shutdown()


def test_a_drop_releases_memory_that_the_group_can_use(replicas: list[LLMEngine]) -> None:
    blocks_per_replica = replicas[0].block_manager.num_total_blocks
    group, _ = fuse(replicas)
    # A sub-block holds 1/g of the layers: each stage has g times the replica's blocks as
    # sub-blocks, plus the sub-blocks of the released layers.
    assert group.block_manager.num_total_blocks > len(replicas) * blocks_per_replica
    split(group, replicas)
    assert replicas[0].block_manager.num_total_blocks == blocks_per_replica


def test_stages_of_a_group_decode_through_graphs_captured_as_sizes_come(llama_dir: Path) -> None:
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=64,
                          attention_backend="triton")
    worker = build_worker(config, resolve_model(str(llama_dir)), (0, 4), torch.device("cpu"))
    worker.become_stage(0, 2)
    assert worker.runner.graphs is not None and worker.runner.graphs is not worker.replica_runner.graphs
    worker.become_replica(None)
    worker.become_stage(0, 2)  # the stage, and its graphs, are kept for the next drop
    assert worker.runner is worker.stage_runners[(0, 2)][1]


def test_stages_prepared_before_a_drop_are_the_ones_the_drop_uses(llama_dir: Path) -> None:
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=64,
                          attention_backend="triton")
    worker = build_worker(config, resolve_model(str(llama_dir)), (0, 4), torch.device("cpu"))
    worker.prepare_stages([2, 4])
    prepared = dict(worker.stage_runners)
    assert sorted(prepared) == [(0, 2), (0, 4), (1, 2), (1, 4), (2, 4), (3, 4)]
    worker.become_stage(1, 2)
    assert worker.runner is prepared[(1, 2)][1] and worker.stage_runners == prepared


def test_a_group_on_the_graph_decode_path_keeps_the_tokens(llama_dir: Path) -> None:
    prompts = PROMPTS[:4]
    expected = [o.outputs[0].token_ids for o in LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)]
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=64,
                          attention_backend="triton", worker_threads=1)
    cluster = Cluster.launch(config, num_replicas=2)
    try:
        cluster.open_links()
        replicas = cluster.engines
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        for i, prompt in enumerate(prompts):
            replicas[i % 2].add_request(f"r{i}", prompt, params)
        finished: dict[str, list[int]] = {}
        run_steps(replicas, 2, finished)
        group, _ = fuse(replicas)
        while group.has_unfinished_requests():
            run_steps([group], 1, finished)
        assert [finished[f"r{i}"] for i in range(len(prompts))] == expected
    finally:
        cluster.shutdown()



def test_a_refused_restore_gives_back_every_block_of_the_group_once_its_requests_end(llama_dir: Path) -> None:
    # Replicas of 24 blocks: a group whose requests hold more than the two replicas' 48
    # blocks uses some of the released layers' sub-blocks, and a restore is refused.
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=24,
                          max_num_batched_tokens=1024, worker_threads=1)
    cluster = Cluster.launch(config, num_replicas=2)
    try:
        cluster.open_links()
        group, _ = fuse(cluster.engines)
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        for i in range(6):
            group.add_request(f"r{i}", [(3 * i + j) % 500 for j in range(150)], params)
        finished: dict[str, list[int]] = {}
        run_steps([group], 2, finished)
        assert group.block_manager.num_total_blocks - group.block_manager.num_free_blocks > 2 * 24
        with pytest.raises(SplitRefused):
            split(group, cluster.engines)
        while group.has_unfinished_requests():
            run_steps([group], 1, finished)
        assert len(finished) == 6
        assert group.block_manager.num_free_blocks == group.block_manager.num_total_blocks
    finally:
        cluster.shutdown()
