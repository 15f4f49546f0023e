"""Drop and restore on a live cluster: engine loops keep running, requests keep arriving.

Specified: requests sent in a steady stream while an operator drops and restores (through
the HTTP endpoints) all complete with the tokens of an uninterrupted run; under a burst
that overloads two KV-starved replicas, the kunserve policy drops on its own and admits
queued requests that the recompute policy leaves waiting, then restores; metrics and
GET /v1/cluster show it; while grouped, every member's metrics follow the group."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_harness import MAX_MODEL_LEN, WAIT_S, RunningServer, scrape

from kunserve import LLM, EngineConfig, RequestOutput, SamplingParams
from kunserve.cluster import runner as runner_module
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.config import CoordinatorConfig
from kunserve.engine.async_engine import EngineDeadError, RequestStream
from kunserve.sampling_params import RequestOutputKind
from kunserve.server.api_server import ServerConfig

pytestmark = pytest.mark.slow  # live servers over clusters of worker processes

MAX_TOKENS = 24
PROMPTS = [[(5 * i + 17 * j) % 500 for j in range(8 + 9 * (i % 7))] for i in range(24)]


@pytest.mark.parametrize("overlap_exchange", [False, True], ids=["blocking", "overlapped"])
def test_requests_sent_through_drops_and_restores_all_complete_unchanged(llama_dir: Path, overlap_exchange: bool
                                                                         ) -> None:
    expected = [o.outputs[0].text for o in LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN).generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)]
    coordinator = CoordinatorConfig("recompute", overlap_exchange=overlap_exchange)
    server = RunningServer(llama_dir, ServerConfig(num_replicas=2, coordinator=coordinator),
                           max_num_batched_tokens=64)
    texts: dict[int, str] = {}

    def send(i: int) -> None:
        body = {"prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        texts[i] = response.json()["choices"][0]["text"] if response.status_code == 200 else response.text

    def steady_stream() -> None:
        senders = []
        for i in range(len(PROMPTS)):
            senders.append(threading.Thread(target=send, args=(i,)))
            senders[-1].start()
            time.sleep(0.05)
        for sender in senders:
            sender.join()

    try:
        traffic = threading.Thread(target=steady_stream)
        traffic.start()
        kinds = []
        for _ in range(2):
            time.sleep(0.2)
            kinds.append(httpx.post(f"{server.url}/v1/cluster/drop", json={}, timeout=60).json()["kind"])
            assert httpx.get(f"{server.url}/v1/cluster").json()["replicas"][1]["mode"] == "pipeline"
            time.sleep(0.3)
            kinds.append(httpx.post(f"{server.url}/v1/cluster/restore", json={}, timeout=60).json()["kind"])
        traffic.join()
        metrics = scrape(server)
    finally:
        server.stop()
    assert kinds == ["drop", "restore", "drop", "restore"]
    assert [texts[i] for i in range(len(PROMPTS))] == expected
    assert metrics["kunserve:drops_total{}"] == 2 and metrics["kunserve:restores_total{}"] == 2


def run_burst(llama_dir: Path, policy: str) -> tuple[list[RequestOutput], int, list[str]]:
    """A burst of 16 requests on two replicas whose KV holds 12 blocks (192 tokens) each.
    Returns the outputs, the most requests running at once, and the transitions."""
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=12, max_num_seqs=16,
                          max_num_batched_tokens=64, worker_threads=1)
    coordinator = CoordinatorConfig(policy, check_interval_s=0.01, drop_after_s=0.02, restore_after_s=0.2)
    cluster = Cluster.launch(config, num_replicas=2, dispatch_policy="round_robin", coordinator=coordinator)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    most_running = 0

    async def final(stream: RequestStream) -> RequestOutput:
        outputs = [out async for out in stream]
        return outputs[-1]

    async def watch(done: asyncio.Event) -> None:
        nonlocal most_running
        while not done.is_set():
            engines = {id(e): e for e in map(cluster.coordinator.runner.engine_of, range(2))}.values()
            most_running = max(most_running, sum(len(e.scheduler.running) for e in engines))
            await asyncio.sleep(0.002)

    async def run() -> list[RequestOutput]:
        cluster.start(asyncio.get_running_loop())
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        streams = [cluster.add_requests([f"b{i}"], [PROMPTS[i][:8] * 5], [params]) for i in range(16)]
        outputs = [await final(stream) for stream in streams]
        while cluster.coordinator.runner.groups:  # let the restore happen
            await asyncio.sleep(0.01)
        done.set()
        await watcher
        return outputs

    try:
        outputs = asyncio.run(run())
        transitions = [t.kind for t in cluster.coordinator.runner.history]
    finally:
        cluster.shutdown()
    return outputs, most_running, transitions


def test_a_burst_is_admitted_after_a_drop_that_recompute_leaves_queued(llama_dir: Path) -> None:
    recompute, recompute_running, recompute_transitions = run_burst(llama_dir, "recompute")
    kunserve, kunserve_running, kunserve_transitions = run_burst(llama_dir, "kunserve")
    assert recompute_transitions == [] and kunserve_transitions[:2] == ["drop", "restore"]
    assert kunserve_running > recompute_running
    assert [o.outputs[0].token_ids for o in kunserve] == [o.outputs[0].token_ids for o in recompute]
    queue = {name: sum(o.metrics.first_scheduled_time - o.metrics.arrival_time for o in outs) / len(outs)
             for name, outs in (("recompute", recompute), ("kunserve", kunserve))}
    print(f"most running: recompute {recompute_running}, kunserve {kunserve_running}; mean queue time (s): {queue}")


def test_a_drop_that_fails_halfway_ends_its_members_requests_with_the_error(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_flight: set[str] = set()  # the members' requests when the drop began

    def fuse_failing_after_the_hand_over(members: list, overlap_chunk: int | None = None) -> None:
        for member in members:
            running, waiting = member.hand_over()
            in_flight.update(seq.request_id for seq in running + waiting)
        raise RuntimeError("a device failed during the exchange")

    monkeypatch.setattr(runner_module, "fuse", fuse_failing_after_the_hand_over)
    # Requests far longer than the test: every one is in flight when the drop begins.
    config = EngineConfig(model=str(llama_dir), max_model_len=4 * MAX_MODEL_LEN, worker_threads=1)
    cluster = Cluster.launch(config, num_replicas=2, coordinator=CoordinatorConfig("recompute"))
    params = SamplingParams(temperature=0.0, max_tokens=4 * MAX_MODEL_LEN - 40, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)

    async def run() -> dict[str, BaseException | RequestOutput]:
        cluster.start(asyncio.get_running_loop())
        streams = [cluster.add_requests([f"f{i}"], [PROMPTS[i]], [params]) for i in range(4)]
        while sum(len(engine.scheduler.running) for engine in cluster.engines) < 4:
            await asyncio.sleep(0.01)  # until every one runs (the test's WAIT_S bounds the wait)
        with pytest.raises(RuntimeError, match="during the exchange"):
            await asyncio.to_thread(cluster.coordinator.runner.drop, [0, 1])
        ends: dict[str, BaseException | RequestOutput] = {}
        for i, stream in enumerate(streams):
            try:
                ends[f"f{i}"] = [out async for out in stream][-1]
            except EngineDeadError as error:
                ends[f"f{i}"] = error
        return ends

    try:
        ends = asyncio.run(asyncio.wait_for(run(), WAIT_S))
    finally:
        cluster.shutdown()
    assert in_flight == {f"f{i}" for i in range(4)}
    assert all(isinstance(ends[i], EngineDeadError) and "during the exchange" in str(ends[i]) for i in in_flight)


def test_while_grouped_the_second_members_metrics_follow_the_group(llama_dir: Path) -> None:
    server = RunningServer(llama_dir, ServerConfig(num_replicas=2, coordinator=CoordinatorConfig("recompute")),
                           worker_threads=1)
    body = {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    try:
        assert httpx.post(f"{server.url}/v1/cluster/drop", json={}, timeout=WAIT_S).status_code == 200
        before = scrape(server, engine=1)
        for _ in range(2):  # the group runs them; its first member's loop steps it
            assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=WAIT_S).status_code == 200
        after = scrape(server, engine=1)
        group_blocks = server.cluster.coordinator.runner.groups[0].engine.block_manager.num_total_blocks
    finally:
        server.stop()
    assert after["kunserve:engine_steps_total{}"] > before["kunserve:engine_steps_total{}"]
    assert after["kunserve:kv_cache_blocks{}"] == group_blocks  # its device holds a share of the group's KV
    assert after["vllm:num_requests_running{}"] == 0  # its requests are counted once, under the first member
    assert after["vllm:generation_tokens_total{}"] == before["vllm:generation_tokens_total{}"]
