"""kunserve's policy on a live CPU cluster (four tiny-Llama replicas, gloo worker processes):
under rising demand a pair fused by a drop grows into a group of four; as the burst's tail
runs out the group shrinks back to the pair, and the pair restores: drop, grow, shrink,
restore, in that order, with no request's tokens changed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kunserve import LLM, EngineConfig, RequestOutput, SamplingParams
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.config import CoordinatorConfig
from kunserve.engine.async_engine import RequestStream
from kunserve.sampling_params import RequestOutputKind

MAX_MODEL_LEN = 192  # 12 blocks: a replica's 16-block cache holds a request to its end
BLOCKS = 16  # per replica; its weights are 44 blocks
# Three waves of requests on replica 0: the first overloads it into a drop (with replica 1,
# the first of the idle ones), the second the pair into a growth; the third, sent once the
# group has grown, is four long requests (long prompts, and they outlive the others). They
# make the burst's tail, whose KV (4 x 9-12 blocks) always fits a pair plus two replicas
# (shrink: 0.5 x (76 + 32) blocks) and never four replicas (restore: 0.5 x 64) until it ends.
WAVES = (10, 16, 4)
SHORT, LONG = (40, 40), (130, 60)  # (prompt, output) tokens
WAIT_S = 120.0  # for a transition: far longer than the burst takes on two CPU cores


def _is_long(i: int) -> bool:
    return i >= WAVES[0] + WAVES[1]


def _params(i: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=(LONG if _is_long(i) else SHORT)[1], ignore_eos=True,
                          output_kind=RequestOutputKind.FINAL_ONLY)


def _prompt(i: int) -> list[int]:
    return [(13 * j + 7 * i) % 500 for j in range((LONG if _is_long(i) else SHORT)[0])]


def test_a_group_grows_under_rising_demand_and_shrinks_back_in_order(llama_dir: Path) -> None:
    num = sum(WAVES)
    expected = [o.outputs[0].token_ids for o in LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN).generate(
        [_prompt(i) for i in range(num)], [_params(i) for i in range(num)], use_tqdm=False)]
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=BLOCKS, max_num_seqs=16,
                          max_num_batched_tokens=128, worker_threads=1)
    coordinator = CoordinatorConfig("kunserve", check_interval_s=0.01, drop_after_s=0.05, restore_after_s=0.15)
    cluster = Cluster.launch(config, num_replicas=4, coordinator=coordinator)
    runner = cluster.coordinator.runner

    async def final(stream: RequestStream) -> RequestOutput:
        return [out async for out in stream][-1]

    def send(requests: range) -> list[RequestStream]:
        return [cluster.replicas[0].add_requests([f"r{i}"], [_prompt(i)], [_params(i)]) for i in requests]

    async def until(transitions: int) -> None:
        """Until the coordinator has made this many transitions (a test that waits forever fails)."""
        async def wait() -> None:
            while len(runner.history) < transitions:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(wait(), WAIT_S)

    async def run() -> list[RequestOutput]:
        cluster.start(asyncio.get_running_loop())
        first, second = WAVES[0], WAVES[0] + WAVES[1]
        streams = send(range(first))
        await until(1)  # the drop
        streams += send(range(first, second))
        await until(2)  # the growth
        streams += send(range(second, num))
        outputs = [await final(stream) for stream in streams]
        await until(4)  # the shrink and the restore
        return outputs

    try:
        outputs = asyncio.run(run())
        kinds = [t.kind for t in runner.history]
        sizes = [len(t.members) for t in runner.history]
    finally:
        cluster.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert kinds == ["drop", "grow", "shrink", "restore"], list(zip(kinds, sizes))
    assert sizes == [2, 4, 4, 2] and runner.history[1].members == [0, 2, 1, 3]
