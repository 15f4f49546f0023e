"""A group that can grow no further falls back to swapping (issue 23): replicas that preempt
by swapping fuse into a pipeline group whose stages swap their own layers' KV to host memory
and back, on gloo worker processes; requests swapped out at a transition are recomputed by
the engine that takes them.

Specified: every request ends with exactly the tokens of an uninterrupted single-device run;
the group did swap; afterwards every device and host block of the group is free."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kunserve import LLM, EngineConfig, LLMEngine, SamplingParams
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.transitions import fuse
from kunserve.engine.cost_model import CostModel, Link, StepCoefficients
from kunserve.sampling_params import RequestOutputKind

MAX_MODEL_LEN = 256
GREEDY = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
# Sixteen requests of up to 220 tokens: far more KV than a replica's 24 blocks of 16 tokens,
# and more than the group's, so replicas and group both preempt.
PROMPTS = [[(3 * i + 7 * j) % 500 for j in range(n)] for i, n in enumerate((20, 90, 35, 100, 60, 12, 80, 45) * 2)]
KV_BLOCKS = 24
SWAP_SPACE_BYTES = 1 << 22  # host room for every request's KV
MAX_STEPS = 5000  # far more than the run takes (about 600 steps)
# Under `kunserve` (preemption_mode "auto"), a cost profile whose host link is all but free
# and whose recompute costs a millisecond a token: every victim with host room swaps.
FREE_LINK_BYTES_S = 1e15
RECOMPUTE_TOKEN_S = 1e-3


@pytest.fixture
def swapping_replicas(llama_dir: Path) -> Iterator[list[LLMEngine]]:
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=KV_BLOCKS, max_num_seqs=8,
                          max_num_batched_tokens=256, swap_space_bytes=SWAP_SPACE_BYTES,
                          worker_threads=1)
    cluster = Cluster.launch(config, num_replicas=2, coordinator=CoordinatorConfig("kunserve-swap"))
    cluster.open_links()
    yield cluster.engines
    cluster.shutdown()


@pytest.fixture
def auto_replicas(llama_dir: Path, tmp_path: Path) -> Iterator[list[LLMEngine]]:
    profile = tmp_path / "free_host_link.json"
    step = StepCoefficients(step_s=0.0, layer_s=0.0, knee_tokens=0, layer_token_s=RECOMPUTE_TOKEN_S,
                            layer_context_s=0.0, layer_attention_s=0.0, sample_s=0.0)
    CostModel("tiny", "test", step, {"host": Link(FREE_LINK_BYTES_S, 0.0)}).save(profile)
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=KV_BLOCKS, max_num_seqs=8,
                          max_num_batched_tokens=256, swap_space_bytes=SWAP_SPACE_BYTES, worker_threads=1,
                          cost_profile=str(profile))
    cluster = Cluster.launch(config, num_replicas=2, coordinator=CoordinatorConfig("kunserve"))
    cluster.open_links()
    yield cluster.engines
    cluster.shutdown()


def single_device(llama_dir: Path) -> dict[str, list[int]]:
    outputs = LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN).generate(PROMPTS, GREEDY, use_tqdm=False)
    return {f"r{i}": out.outputs[0].token_ids for i, out in enumerate(outputs)}


def run_until(engines: list[LLMEngine], finished: dict[str, list[int]], done: Callable[[], bool]) -> None:
    for _ in range(MAX_STEPS):
        if done():
            return
        for engine in engines:
            for out in engine.step():
                finished[out.request_id] = out.outputs[0].token_ids
    raise AssertionError(f"not done within {MAX_STEPS} steps")


def test_a_group_swaps_its_stages_kv_and_keeps_the_tokens(swapping_replicas: list[LLMEngine], llama_dir: Path) -> None:
    replicas = swapping_replicas
    for i, prompt in enumerate(PROMPTS):
        replicas[i % 2].add_request(f"r{i}", prompt, GREEDY)
    finished: dict[str, list[int]] = {}
    run_until(replicas, finished, lambda: all(engine.scheduler.swapped for engine in replicas))
    group, _ = fuse(replicas)  # the requests swapped out on the replicas are recomputed by the group
    run_until([group], finished, lambda: not group.has_unfinished_requests())
    assert group.scheduler.num_swap_outs > 0
    assert finished == single_device(llama_dir)
    pool = group.scheduler.swap_pool
    assert pool is not None and pool.num_free_blocks == pool.num_total_blocks
    assert group.block_manager.num_free_blocks == group.block_manager.num_total_blocks


def test_a_kunserve_group_choosing_to_swap_swaps_its_stages_kv_and_keeps_the_tokens(
        auto_replicas: list[LLMEngine], llama_dir: Path) -> None:
    replicas = auto_replicas
    assert all(engine.config.preemption_mode == "auto" for engine in replicas)
    for i, prompt in enumerate(PROMPTS):
        replicas[i % 2].add_request(f"r{i}", prompt, GREEDY)
    finished: dict[str, list[int]] = {}
    run_until(replicas, finished, lambda: all(engine.scheduler.swapped for engine in replicas))
    group, _ = fuse(replicas)
    run_until([group], finished, lambda: not group.has_unfinished_requests())
    assert group.scheduler.num_swap_outs > 0
    assert finished == single_device(llama_dir)
    pool = group.scheduler.swap_pool
    assert pool is not None and pool.num_free_blocks == pool.num_total_blocks
