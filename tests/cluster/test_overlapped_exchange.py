"""The overlapped KV exchange of a drop (kunserve/cluster/exchange.py), on gloo worker
processes: the group starts at once, queued requests are admitted into the freed memory,
and the running requests' other-stage KV moves in chunks between the group's steps, each
request running again once its KV has arrived.

Specified: every request ends with exactly the tokens of an uninterrupted single-device run
(greedy and seeded; some finish while the exchange is under way); queued requests run
before the exchange ends; a request aborted while it waits for its KV frees its blocks once
the KV has landed; a drop into a full cache (an exchange in rounds) keeps the tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_steps import run_steps

from kunserve import LLM, EngineConfig, LLMEngine, SamplingParams
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.exchange import OverlappedExchange
from kunserve.cluster.transitions import fuse, split
from kunserve.sampling_params import RequestOutputKind

MAX_MODEL_LEN = 256
CHUNK = 2  # sub-blocks per chunk: small, so the exchange spans many of the group's steps
PROMPTS = [[(7 * i + 13 * j) % 500 for j in range(n)] for i, n in enumerate((3, 19, 70, 130, 45, 8, 33, 90))]
# Requests 6 and 7 queue at the drop (3 run per replica) and are short: they finish mid-exchange.
MAX_TOKENS = (40, 30, 40, 25, 40, 35, 3, 4)
Finished = dict[str, list[int]]


def params(seeded: bool) -> list[SamplingParams]:
    return [SamplingParams(temperature=1.0 if seeded else 0.0, seed=7 + i if seeded else None, max_tokens=n,
                           ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
            for i, n in enumerate(MAX_TOKENS)]


def single_device(llama_dir: Path, seeded: bool) -> Finished:
    outputs = LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN).generate(PROMPTS, params(seeded), use_tqdm=False)
    return {f"r{i}": out.outputs[0].token_ids for i, out in enumerate(outputs)}


@pytest.fixture(params=[2, 4], ids=["g2", "g4"])
def replicas(llama_dir: Path, request: pytest.FixtureRequest) -> Iterator[list[LLMEngine]]:
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=96,
                          max_num_seqs=6 // request.param, max_num_batched_tokens=64, worker_threads=1)
    cluster = Cluster.launch(config, num_replicas=request.param)
    cluster.open_links()
    yield cluster.engines
    cluster.shutdown()


def start(replicas: list[LLMEngine], seeded: bool) -> Finished:
    for i, (prompt, p) in enumerate(zip(PROMPTS, params(seeded), strict=True)):
        replicas[i % len(replicas)].add_request(f"r{i}", prompt, p)
    finished: Finished = {}
    run_steps(replicas, 6, finished)
    return finished


def exchange_of(group: LLMEngine) -> OverlappedExchange:
    assert isinstance(group.between_steps, OverlappedExchange)
    return group.between_steps


def through_an_overlapped_drop(replicas: list[LLMEngine], seeded: bool) -> tuple[Finished, set[str]]:
    """Requests started, dropped with the exchange overlapping the group's steps, restored."""
    finished = start(replicas, seeded)
    group, stats = fuse(replicas, overlap_chunk=CHUNK)
    assert stats.exchange_s < stats.duration_s
    mid_exchange: set[str] = set()
    while group.between_steps is not None:
        for out in group.step():
            finished[out.request_id] = out.outputs[0].token_ids
            mid_exchange.add(out.request_id)
    run_steps([group], 6, finished)
    finished.update({out.request_id: out.outputs[0].token_ids for out in split(group, replicas)[0]})
    while any(engine.has_unfinished_requests() for engine in replicas):
        run_steps(replicas, 1, finished)
    return finished, mid_exchange


def test_greedy_tokens_equal_an_uninterrupted_run_with_requests_finishing_mid_exchange(
    replicas: list[LLMEngine], llama_dir: Path
) -> None:
    finished, mid_exchange = through_an_overlapped_drop(replicas, seeded=False)
    assert finished == single_device(llama_dir, seeded=False)
    assert mid_exchange  # some requests finished while KV was still moving
    for engine in replicas:
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


def test_seeded_tokens_equal_an_uninterrupted_run(replicas: list[LLMEngine], llama_dir: Path) -> None:
    assert through_an_overlapped_drop(replicas, seeded=True)[0] == single_device(llama_dir, seeded=True)


def test_queued_requests_run_in_the_groups_first_step_and_running_ones_switch_as_their_kv_arrives(
    replicas: list[LLMEngine],
) -> None:
    start(replicas, seeded=False)
    queued = {seq.request_id for engine in replicas for seq in engine.scheduler.waiting}
    group, _ = fuse(replicas, overlap_chunk=CHUNK)
    parked = {seq.request_id for seq in group.scheduler.parked}
    group.step()
    running = {seq.request_id for seq in group.scheduler.running}
    parked_after_first_step = {seq.request_id for seq in group.scheduler.parked}
    while len(group.scheduler.parked) == len(parked):
        group.step()
    parked_at_first_switch = {seq.request_id for seq in group.scheduler.parked}
    group.finish_between_steps()
    split(group, replicas)
    assert queued and parked and queued & running and parked_after_first_step == parked
    # Requests switch to the group one by one as their KV arrives, not all at the end.
    assert parked_at_first_switch and parked_at_first_switch < parked


def test_a_request_aborted_while_its_kv_moves_frees_its_blocks_once_the_kv_has_landed(
    replicas: list[LLMEngine], llama_dir: Path
) -> None:
    start(replicas, seeded=False)
    group, _ = fuse(replicas, overlap_chunk=CHUNK)
    last = max(group.scheduler.parked, key=lambda s: len(s.block_ids))  # its KV arrives last
    assert group.abort_request(last.request_id) is not None
    assert last.block_ids  # kept while the exchange may still write them
    group.finish_between_steps()
    assert not last.block_ids and not group.scheduler.parked
    finished: Finished = {}
    run_steps([group], 4, finished)
    finished.update({out.request_id: out.outputs[0].token_ids for out in split(group, replicas)[0]})
    while any(engine.has_unfinished_requests() for engine in replicas):
        run_steps(replicas, 1, finished)
    reference = single_device(llama_dir, seeded=False)
    assert last.request_id not in finished
    assert {k: v for k, v in finished.items() if k in reference} == {
        k: v for k, v in reference.items() if k in finished and k != last.request_id}
    for engine in replicas:
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


def test_a_drop_into_a_full_cache_exchanges_in_rounds_between_steps_and_keeps_the_tokens(llama_dir: Path) -> None:
    # Two replicas whose every block is in use: the exchange needs rounds, each writing what
    # the round before read.
    num_requests, prompt_len = 8, 190
    prompts = [[(11 * i + 5 * j) % 500 for j in range(prompt_len)] for i in range(2 * num_requests)]
    p = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    expected = [o.outputs[0].token_ids for o in LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN).generate(
        prompts, p, use_tqdm=False)]
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=96,
                          max_num_seqs=num_requests, max_num_batched_tokens=num_requests * prompt_len,
                          worker_threads=1)
    cluster = Cluster.launch(config, num_replicas=2)
    try:
        cluster.open_links()
        replicas = cluster.engines
        for i, prompt in enumerate(prompts):
            replicas[i % 2].add_request(f"r{i}", prompt, p)
        finished: Finished = {}
        run_steps(replicas, 1, finished)
        group, stats = fuse(replicas, overlap_chunk=CHUNK)
        assert stats.exchange_rounds > 1
        while group.has_unfinished_requests():  # (the replicas could not take it back: no split)
            run_steps([group], 1, finished)
    finally:
        cluster.shutdown()
    assert [finished[f"r{i}"] for i in range(len(prompts))] == expected
