"""Growing a pipeline group on gloo worker processes (kunserve/cluster/growth.py): a pair of
tiny-Llama replicas fused by a drop grows into a 4-stage group, with two replicas joining
or with another pair merging in, while requests run and queue on all of them; the grown
group splits back into its four replicas, or shrinks back to the pair and two replicas first.

Specified (DESIGN.md §4, invariants 2-4): every request ends with exactly the tokens of an
uninterrupted single-device run, seeded ones included; none is lost; afterwards every block
is free and every device holds the original weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_steps import run_steps

from kunserve import LLM, EngineConfig, LLMEngine, SamplingParams
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.growth import grow, shrink
from kunserve.cluster.transitions import fuse, split
from kunserve.engine.staged_block_manager import StagedBlockManager
from kunserve.sampling_params import RequestOutputKind
from kunserve.worker.protocol import DeviceCalls

MAX_MODEL_LEN = 256
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
SEEDED = SamplingParams(temperature=1.0, seed=11, max_tokens=40, ignore_eos=True,
                        output_kind=RequestOutputKind.FINAL_ONLY)
PROMPTS = [[(5 * i + 11 * j) % 500 for j in range(n)] for i, n in enumerate((9, 60, 21, 130, 4, 77, 38, 101, 15, 50))]
STAGE_ORDER = [0, 2, 1, 3]  # the pair's members become stages 0 and 2; its partners 1 and 3


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[Cluster]:
    # Two sequences per replica at a time, so requests queue through the transitions.
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=96, max_num_seqs=2,
                          max_num_batched_tokens=64, worker_threads=1)
    launched = Cluster.launch(config, num_replicas=4)
    launched.open_links()
    yield launched
    launched.shutdown()


def single_device(llama_dir: Path, params: SamplingParams) -> dict[str, list[int]]:
    outputs = LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN).generate(PROMPTS, params, use_tqdm=False)
    return {f"r{i}": out.outputs[0].token_ids for i, out in enumerate(outputs)}


def run_to_end(engines: list[LLMEngine], finished: dict[str, list[int]]) -> None:
    while any(engine.has_unfinished_requests() for engine in engines):
        run_steps(engines, 1, finished)


def grow_and_split(replicas: list[LLMEngine], params: SamplingParams, merge_pairs: bool,
                   shrink_first: bool = False) -> dict[str, list[int]]:
    """Requests on all four replicas; replicas 0 and 1 fuse (and, merging, 2 and 3 too); the
    pair grows into four stages; the group runs, splits back (shrinking to the pair first,
    which runs and splits), and everything runs out."""
    for i, prompt in enumerate(PROMPTS):
        replicas[i % 4].add_request(f"r{i}", prompt, params)
    finished: dict[str, list[int]] = {}
    run_steps(replicas, 5, finished)
    pair, _ = fuse(replicas[:2])
    others = [fuse(replicas[2:])[0]] if merge_pairs else replicas[2:]
    run_steps([pair, *others], 4, finished)
    stages = [replicas[i] for i in STAGE_ORDER]
    grown, outputs, stats = grow([pair, *others] if merge_pairs else [pair], stages)
    finished.update((out.request_id, out.outputs[0].token_ids) for out in outputs)
    assert isinstance(grown.block_manager, StagedBlockManager) and len(grown.block_manager.stages) == 4
    assert stats.sub_blocks_moved > 0 and grown.config.max_num_seqs == 8
    run_steps([grown], 6, finished)
    if shrink_first:
        pair, outputs, stats = shrink(grown, stages, 2)
        finished.update((out.request_id, out.outputs[0].token_ids) for out in outputs)
        assert len(pair.block_manager.stages) == 2 and pair.config.max_num_seqs == 4 and stats.sub_blocks_moved > 0
        run_steps([pair, *replicas[2:]], 6, finished)
        grown, stages = pair, replicas[:2]
    for out in split(grown, stages)[0]:
        finished[out.request_id] = out.outputs[0].token_ids
    run_to_end(replicas, finished)
    return finished


@pytest.mark.parametrize("merge_pairs", [False, True], ids=["with-replicas", "with-a-pair"])
def test_a_pair_grows_into_four_stages_and_splits_back_keeping_the_tokens(
    cluster: Cluster, llama_dir: Path, merge_pairs: bool
) -> None:
    replicas = cluster.engines
    weights_before = [engine.executor.call(0, DeviceCalls.weight_digests) for engine in replicas]
    assert grow_and_split(replicas, GREEDY, merge_pairs) == single_device(llama_dir, GREEDY)
    for engine in replicas:
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
    assert [engine.executor.call(0, DeviceCalls.weight_digests) for engine in replicas] == weights_before


def test_a_grown_group_shrinks_back_to_its_pair_and_the_replicas_keeping_the_tokens(
    cluster: Cluster, llama_dir: Path
) -> None:
    replicas = cluster.engines
    weights_before = [engine.executor.call(0, DeviceCalls.weight_digests) for engine in replicas]
    assert grow_and_split(replicas, SEEDED, merge_pairs=False, shrink_first=True) == single_device(llama_dir, SEEDED)
    for engine in replicas:
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
    assert [engine.executor.call(0, DeviceCalls.weight_digests) for engine in replicas] == weights_before


def test_seeded_requests_keep_their_random_streams_through_a_growth(cluster: Cluster, llama_dir: Path) -> None:
    assert grow_and_split(cluster.engines, SEEDED, merge_pairs=False) == single_device(llama_dir, SEEDED)


def test_a_grown_group_has_more_kv_memory_than_the_pair(cluster: Cluster) -> None:
    replicas = cluster.engines
    pair, _ = fuse(replicas[:2])
    pair_blocks = pair.block_manager.num_total_blocks
    grown, _, _ = grow([pair], [replicas[i] for i in STAGE_ORDER])
    # Each stage now holds a quarter of the layers: its sub-blocks are half the pair's, twice as many.
    assert grown.block_manager.num_total_blocks > 2 * pair_blocks
    split(grown, [replicas[i] for i in STAGE_ORDER])
