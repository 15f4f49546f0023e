"""The drop mechanism on real worker processes (gloo): two replicas of the tiny Llama become
the two stages of a group and back.

Specified: dropping releases exactly the other stage's layer slots, as sub-blocks; the KV
of a running request's other-stage layers moves to the peer bit for bit; restoring refills
the dropped weights from the peer to the original bytes, and the replicas then generate
what they generated before."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kunserve import EngineConfig, LLMEngine, SamplingParams
from kunserve.cluster.cluster import Cluster
from kunserve.executor.multiproc import MultiprocExecutor
from kunserve.sampling_params import RequestOutputKind
from kunserve.worker.protocol import DeviceCalls

STAGES = 2
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
PROMPT = [(11 * j + 5) % 500 for j in range(40)]


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[Cluster]:
    config = EngineConfig(model=str(llama_dir), max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=64)
    launched = Cluster.launch(config, num_replicas=2, dispatch_policy="round_robin")
    launched.open_links()
    yield launched
    launched.shutdown()


def executors(cluster: Cluster) -> list[MultiprocExecutor]:
    found = [engine.executor for engine in cluster.engines]
    assert all(isinstance(e, MultiprocExecutor) for e in found)
    return found  # type: ignore[return-value]


def generate(engine: LLMEngine, request_id: str, max_tokens: int = 12) -> list[int]:
    params = SamplingParams(**{**GREEDY.__dict__, "max_tokens": max_tokens})
    engine.add_request(request_id, PROMPT, params)
    while True:
        for out in engine.step():
            if out.request_id == request_id:
                return out.outputs[0].token_ids


def restore_from_weight_source(cluster: Cluster) -> None:
    for executor in executors(cluster):
        executor.call(0, DeviceCalls.become_replica, None)


def test_dropping_releases_the_other_stages_layers_as_sub_blocks(cluster: Cluster) -> None:
    e0 = executors(cluster)[0]
    layout = e0.layout
    try:
        released = e0.call(0, DeviceCalls.become_stage, 0, STAGES)
    finally:
        e0.call(0, DeviceCalls.become_replica, None)
    expected = [i for layer in (2, 3) for i in layout.released_sub_blocks(layer, STAGES)]
    assert released == expected
    per_layer = layout.layer_elems // layout.sub_block_elems(STAGES)
    assert len(released) == 2 * per_layer
    first_kv_sub_block = layout.initial_kv_blocks().start * STAGES
    assert max(released) < first_kv_sub_block


def test_kv_of_the_other_stage_moves_to_the_peer_bit_for_bit(cluster: Cluster) -> None:
    engine = cluster.engines[0]
    e0, e1 = executors(cluster)
    engine.add_request("running", PROMPT, GREEDY)
    for _ in range(4):
        engine.step()
    blocks = list(engine.scheduler.running[0].block_ids)
    source = [b * STAGES + 1 for b in blocks]  # stage 1's layers of each block, on device 0
    target = [(e1.layout.initial_kv_blocks().start + i) * STAGES for i in range(len(source))]
    try:
        e0.call(0, DeviceCalls.become_stage, 0, STAGES)
        e1.call(0, DeviceCalls.become_stage, 1, STAGES)
        sent = e0.call(0, DeviceCalls.kv_digests, source)
        one_sub_block = e0.layout.sub_block_elems(STAGES) * e0.layout.elem_bytes  # many small copies
        e1.call(0, DeviceCalls.pull_kv, e0.global_ranks[0], source, target, one_sub_block)
        received = e1.call(0, DeviceCalls.kv_digests, target)
        untouched = e0.call(0, DeviceCalls.kv_digests, [b * STAGES for b in blocks])
    finally:
        restore_from_weight_source(cluster)
        engine.abort_request("running")
        while engine.has_unfinished_requests():
            engine.step()
    assert received == sent
    assert len(set(sent)) == len(sent) and set(sent).isdisjoint(untouched)


def test_restoring_from_the_peer_gives_back_the_weights_and_the_tokens(cluster: Cluster) -> None:
    e0, e1 = executors(cluster)
    weights_before = [e.call(0, DeviceCalls.weight_digests) for e in (e0, e1)]
    tokens_before = [generate(engine, f"before-{i}") for i, engine in enumerate(cluster.engines)]
    e0.call(0, DeviceCalls.become_stage, 0, STAGES)
    e1.call(0, DeviceCalls.become_stage, 1, STAGES)
    # Fill the released slots with KV bytes, as requests admitted after a drop would.
    some_kv = [e0.layout.initial_kv_blocks().start * STAGES] * 8
    for executor, released in ((e0, [2, 3]), (e1, [0, 1])):
        slots = [i for layer in released for i in executor.layout.released_sub_blocks(layer, STAGES)][:8]
        executor.call(0, DeviceCalls.move_kv, some_kv, slots)
    refills = [e0.post(0, DeviceCalls.become_replica, {2: e1.global_ranks[0], 3: e1.global_ranks[0]}),
               e1.post(0, DeviceCalls.become_replica, {0: e0.global_ranks[0], 1: e0.global_ranks[0]})]
    for refill in refills:
        refill.wait()
    assert [e.call(0, DeviceCalls.weight_digests) for e in (e0, e1)] == weights_before
    assert [generate(engine, f"after-{i}") for i, engine in enumerate(cluster.engines)] == tokens_before
