"""Several devices as worker processes (gloo on CPU): replicas behind a dispatcher, and
pipeline groups with micro-batches in flight (workers that die: tests/cluster/test_recovery.py).

Specified: a pipeline of g stages and a cluster of replicas give exactly the tokens of one
device; the dispatcher spreads requests by policy and skips dead replicas."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from server_harness import MAX_MODEL_LEN

from kunserve import LLM, EngineConfig, RequestOutput, SamplingParams
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.dispatcher import Dispatcher, NoReplicaError
from kunserve.engine.async_engine import RequestStream
from kunserve.engine.stats import StepStats
from kunserve.executor.multiproc import MultiprocExecutor
from kunserve.layout import stage_ranges
from kunserve.sampling_params import RequestOutputKind

pytestmark = pytest.mark.slow  # clusters of worker processes

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
# Lengths that make chunked prefill (budget 64) split prompts across micro-batches.
PROMPTS = [[(7 * i + 13 * j) % 500 for j in range(n)] for i, n in enumerate((3, 19, 70, 130, 45, 8))]


@pytest.fixture(scope="module")
def single_device(llama_dir: Path) -> list[list[int]]:
    llm = LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=64)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


# ---- layer split and dispatch -------------------------------------------------------------


@pytest.mark.parametrize(("layers", "stages", "expected"), [
    (4, 2, [(0, 2), (2, 4)]),
    (4, 3, [(0, 1), (1, 2), (2, 4)]),
    (32, 4, [(0, 8), (8, 16), (16, 24), (24, 32)]),
])
def test_pipeline_stages_split_the_layers_in_order(layers: int, stages: int, expected: list) -> None:
    assert stage_ranges(layers, stages) == expected


def test_more_stages_than_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        stage_ranges(4, 5)


def test_round_robin_cycles_over_live_replicas() -> None:
    dispatcher = Dispatcher("round_robin")
    assert [dispatcher.choose([0, None, 0]) for _ in range(4)] == [0, 2, 0, 2]


def test_least_loaded_picks_the_smallest_kv_demand() -> None:
    assert Dispatcher("least_loaded").choose([30, 12, None, 20]) == 1


def test_least_loaded_takes_turns_among_equal_demands() -> None:
    dispatcher = Dispatcher("least_loaded")
    assert [dispatcher.choose([5, 5, 5]) for _ in range(3)] == [0, 1, 2]


def test_a_cluster_with_every_replica_down_refuses() -> None:
    with pytest.raises(NoReplicaError):
        Dispatcher().choose([None, None])


def test_an_unknown_dispatch_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="dispatch_policy"):
        Dispatcher("random")


# ---- the same tokens as one device --------------------------------------------------------


@pytest.mark.parametrize(("stages", "lookahead"), [(2, True), (4, True), (2, False)])
def test_a_pipeline_group_gives_the_single_device_tokens(
    llama_dir: Path, single_device: list[list[int]], stages: int, lookahead: bool
) -> None:
    llm = LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=64,
              pipeline_parallel_size=stages, worker_threads=1, lookahead_batching=lookahead)
    try:
        assert isinstance(llm.engine.executor, MultiprocExecutor) and llm.engine.executor.max_in_flight == stages
        outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == single_device


def test_a_pipeline_measures_its_bubble_from_every_stages_busy_clock(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN, pipeline_parallel_size=2, worker_threads=1)
    try:
        llm.engine.measure_pipeline()
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        measured = llm.engine.measure_pipeline()
        assert len(llm.engine.executor.take_busy_seconds()) == 2
    finally:
        llm.engine.shutdown()
    # Each stage computes only while steps are in flight: busy within the available time.
    assert 0 < measured.busy_s < measured.stage_s
    assert measured.bubble_fraction is not None and 0 < measured.bubble_fraction < 1


def test_a_pipeline_reports_its_bubble_to_the_stats_listener_each_window(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN, pipeline_parallel_size=2, worker_threads=1,
              bubble_window_s=0.01)
    reported: list[StepStats] = []
    llm.engine.stats_listener = reported.append
    try:
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    windows = [stats.pipeline for stats in reported if stats.pipeline is not None]
    assert windows and all(w.busy_s >= 0 and w.stage_s >= 0 for w in windows)
    assert 0 < sum(w.busy_s for w in windows) < sum(w.stage_s for w in windows)


def test_replicas_give_the_single_device_tokens_and_share_the_requests(
    llama_dir: Path, single_device: list[list[int]]
) -> None:
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=64)
    cluster = Cluster.launch(config, num_replicas=2, dispatch_policy="round_robin")
    finished_on = [0, 0]
    for index, engine in enumerate(cluster.engines):
        engine.stats_listener = lambda stats, i=index: finished_on.__setitem__(i, finished_on[i] + len(stats.finished))
    params = SamplingParams(**{**GREEDY.__dict__, "output_kind": RequestOutputKind.FINAL_ONLY})

    async def final(stream: RequestStream) -> RequestOutput:
        outputs = [out async for out in stream]
        return outputs[-1]

    async def run() -> list[RequestOutput]:
        cluster.start(asyncio.get_running_loop())
        streams = [cluster.add_requests([f"r{i}"], [prompt], [params]) for i, prompt in enumerate(PROMPTS)]
        return [await final(stream) for stream in streams]

    try:
        outputs = asyncio.run(run())
    finally:
        cluster.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == single_device
    assert finished_on == [3, 3]
