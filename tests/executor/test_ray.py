"""The Ray executor on a local two-node Ray cluster (ray.cluster_utils: two raylets on
loopback, one CPU each, so that each replica gets a node of its own), gloo between actors.

Specified: a replica on a Ray actor and a pipeline stretched over both nodes give exactly the
tokens of one device; replicas on two hosts drop into a group, restore and migrate requests
with the tokens unchanged, every transfer between them taking the network path (send and
receive, no mapped arenas); killing one node's actors fails its requests fast, naming the
worker, while the replica on the other node serves on."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_harness import MAX_MODEL_LEN, RunningServer, scrape, wait_until

try:
    import ray
except ImportError:
    if os.environ.get("CI"):  # CI installs the ray extra: there these tests must run
        raise
    pytest.skip("ray is not installed (pip install -e '.[ray]')", allow_module_level=True)
from engine_steps import run_steps
from ray.cluster_utils import Cluster as RayCluster

from kunserve import LLM, EngineConfig, LLMEngine, SamplingParams
from kunserve.cluster import migration
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.policies.kunserve import KunServePolicy
from kunserve.cluster.transitions import fuse, split
from kunserve.executor.ray_executor import RayExecutor
from kunserve.executor.workers import WorkerDiedError
from kunserve.sampling_params import RequestOutputKind
from kunserve.server.api_server import ServerConfig
from kunserve.worker.protocol import DeviceCalls

pytestmark = pytest.mark.slow  # Ray clusters

NODES = 2
CPUS_PER_NODE = 1  # a worker reserves one: a node holds one replica
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
# Lengths that make chunked prefill (budget 64) split prompts across micro-batches.
PROMPTS = [[(7 * i + 13 * j) % 500 for j in range(n)] for i, n in enumerate((3, 19, 70, 130, 45, 8))]
NETWORK_CALLS = {"send_kv", "recv_kv"}
MAPPED_CALLS = {"export_arena", "open_peer", "pull_kv"}
RAY_ARGS = {"distributed_executor_backend": "ray", "worker_threads": 1}


@pytest.fixture(scope="module", autouse=True)
def two_nodes() -> Iterator[None]:
    cluster = RayCluster(initialize_head=True, head_node_args={"num_cpus": CPUS_PER_NODE})
    for _ in range(NODES - 1):
        cluster.add_node(num_cpus=CPUS_PER_NODE)
    ray.init(address=cluster.address)
    yield
    # A replica restarting when its server stopped finishes that attempt on its own thread (its
    # worker may still be starting); Ray goes down after it, or that thread would reconnect.
    wait_until(lambda: not any(t.name == "kunserve-recovery" and t.is_alive() for t in threading.enumerate()),
               "restarts under way at shutdown to end")
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def reference(llama_dir: Path) -> dict[str, list[int]]:
    llm = LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=64)
    return {f"r{i}": out.outputs[0].token_ids for i, out in enumerate(llm.generate(PROMPTS, GREEDY, use_tqdm=False))}


@pytest.fixture
def replicas_on_two_hosts(llama_dir: Path) -> Iterator[Cluster]:
    # Few sequences per replica at a time, so some requests queue through the transitions.
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=96, max_num_seqs=3,
                          max_num_batched_tokens=64, **RAY_ARGS)
    cluster = Cluster.launch(config, num_replicas=2)
    yield cluster
    cluster.shutdown()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple]]:
    """The worker calls (name, arguments) the control plane makes on Ray replicas."""
    made: list[tuple[str, tuple]] = []
    start_call = RayExecutor._start_call

    def recording(self: RayExecutor, rank: int, name: str, args: tuple, kwargs: dict) -> None:
        made.append((name, args))
        start_call(self, rank, name, args, kwargs)

    monkeypatch.setattr(RayExecutor, "_start_call", recording)
    return made


def ray_executor(engine: LLMEngine) -> RayExecutor:
    assert isinstance(engine.executor, RayExecutor)
    return engine.executor


def run_to_end(engines: list[LLMEngine], finished: dict[str, list[int]]) -> dict[str, list[int]]:
    while any(engine.has_unfinished_requests() for engine in engines):
        run_steps(engines, 1, finished)
    return finished


@pytest.mark.parametrize(("stages", "placement"), [(1, "STRICT_PACK"), (2, "STRICT_SPREAD")])
def test_a_ray_replica_and_a_pipeline_across_nodes_give_the_single_device_tokens(
    llama_dir: Path, reference: dict[str, list[int]], stages: int, placement: str
) -> None:
    llm = LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=64, pipeline_parallel_size=stages,
              ray_placement_strategy=placement, **RAY_ARGS)
    try:
        executor = ray_executor(llm.engine)
        assert len(set(executor.hosts)) == stages and executor.max_in_flight == stages
        outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    assert {f"r{i}": out.outputs[0].token_ids for i, out in enumerate(outputs)} == reference


def names(calls: list[tuple[str, tuple]]) -> set[str]:
    return {name for name, _ in calls}


def test_a_drop_and_a_restore_across_hosts_keep_the_tokens_over_the_network(
    replicas_on_two_hosts: Cluster, reference: dict[str, list[int]], calls: list[tuple[str, tuple]]
) -> None:
    cluster = replicas_on_two_hosts
    replicas = cluster.engines
    assert ray_executor(replicas[0]).hosts != ray_executor(replicas[1]).hosts
    # What the planner sees: two hosts (it charges a group of both the network's cost).
    policy = cluster.coordinator.policy
    assert isinstance(policy, KunServePolicy)
    assert policy.replica_load(0).host != policy.replica_load(1).host
    weights_before = [ray_executor(engine).call(0, DeviceCalls.weight_digests) for engine in replicas]
    cluster.open_links()
    for i, prompt in enumerate(PROMPTS):
        replicas[i % 2].add_request(f"r{i}", prompt, GREEDY)
    finished: dict[str, list[int]] = {}
    run_steps(replicas, 6, finished)
    before_drop = len(calls)
    group, _ = fuse(replicas)
    drop_calls = calls[before_drop:]
    run_steps([group], 8, finished)
    before_restore = len(calls)
    for out in split(group, replicas)[0]:
        finished[out.request_id] = out.outputs[0].token_ids
    restore_calls = calls[before_restore:]
    assert run_to_end(replicas, finished) == reference
    for engine in replicas:
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
    assert [ray_executor(engine).call(0, DeviceCalls.weight_digests) for engine in replicas] == weights_before
    # The KV of the drop and of the restore, and the restored weights, all went over the network.
    assert NETWORK_CALLS <= names(drop_calls) and NETWORK_CALLS <= names(restore_calls)
    refills = [args for name, args in restore_calls if name == "become_replica"]
    assert len(refills) == 2 and all(len(args) == 2 and args[1] for args in refills)  # (refill_from, over_network)
    assert not MAPPED_CALLS & names(calls)


def test_kv_sent_across_hosts_in_chunks_arrives_bit_for_bit(replicas_on_two_hosts: Cluster) -> None:
    source, destination = (ray_executor(engine) for engine in replicas_on_two_hosts.engines)
    engine = replicas_on_two_hosts.engines[0]
    engine.add_request("r0", PROMPTS[3], GREEDY)
    engine.step()  # the prompt's first chunk: KV in a few blocks
    blocks = list(engine.scheduler.running[0].block_ids)
    targets = list(destination.kv_block_ids())[: len(blocks)]
    sent = source.call(0, DeviceCalls.kv_digests, blocks)
    assert len(blocks) > 1 and destination.call(0, DeviceCalls.kv_digests, targets) != sent
    row_bytes = source.layout.block_bytes
    sending = source.post(0, DeviceCalls.send_kv, destination.global_ranks[0], blocks, row_bytes)  # a block a chunk
    receiving = destination.post(0, DeviceCalls.recv_kv, source.global_ranks[0], targets, row_bytes)
    sending.wait()
    receiving.wait()
    assert destination.call(0, DeviceCalls.kv_digests, targets) == sent


def test_a_request_migrates_across_hosts_over_the_network(
    replicas_on_two_hosts: Cluster, reference: dict[str, list[int]], calls: list[tuple[str, tuple]]
) -> None:
    cluster = replicas_on_two_hosts
    source, destination = cluster.engines
    cluster.open_links()
    for i, prompt in enumerate(PROMPTS[:3]):
        source.add_request(f"r{i}", prompt, GREEDY)
    finished: dict[str, list[int]] = {}
    run_steps([source], 5, finished)
    seq = source.scheduler.running[-1]
    assert migration.migrate(cluster, seq, 0, 1) is not None
    assert seq in destination.scheduler.running
    assert NETWORK_CALLS <= names(calls) and not MAPPED_CALLS & names(calls)
    assert run_to_end(cluster.engines, finished) == {f"r{i}": reference[f"r{i}"] for i in range(3)}


def test_a_worker_that_cannot_start_fails_the_launch_with_its_error_and_frees_its_node(llama_dir: Path) -> None:
    with pytest.raises(WorkerDiedError, match="(?s)worker 0 .* died: .*memory budget"):
        LLM(str(llama_dir), memory_budget_bytes=1, **RAY_ARGS)
    wait_until(lambda: ray.available_resources().get("CPU") == NODES * CPUS_PER_NODE, "the nodes' CPUs to be free")


def test_killing_one_nodes_workers_fails_its_requests_fast_while_the_other_node_serves(llama_dir: Path) -> None:
    server = RunningServer(llama_dir, ServerConfig(num_replicas=2, dispatch_policy="round_robin"), **RAY_ARGS)
    body = {"prompt": "Once upon a time", "max_tokens": MAX_MODEL_LEN - 16, "ignore_eos": True, "temperature": 0}
    responses: dict[int, httpx.Response] = {}
    answered_at: dict[int, float] = {}

    def post(i: int) -> None:
        responses[i] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        answered_at[i] = time.monotonic()

    try:
        victim, survivor = (ray_executor(engine) for engine in server.cluster.engines)
        assert victim.hosts != survivor.hosts
        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: [len(e.scheduler.running) for e in server.cluster.engines] == [2, 2],
                   "two requests running on each replica")
        for handle in victim.workers.handles:  # every worker of the victim's node
            os.kill(handle.pid, signal.SIGKILL)
        for thread in threads:
            thread.join()
        statuses = sorted(r.status_code for r in responses.values())
        failed = [r.json()["error"]["message"] for r in responses.values() if r.status_code != 200]
        assert statuses == [200, 200, 500, 500]
        assert all("worker 0" in message and "died" in message for message in failed)
        # Fast: the failures do not wait for anything, the survivors decode their whole outputs.
        failed_at = [answered_at[i] for i, r in responses.items() if r.status_code != 200]
        served_at = [answered_at[i] for i, r in responses.items() if r.status_code == 200]
        assert max(failed_at) < min(served_at)
        after = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 4}, timeout=60)
        assert after.status_code == 200
        assert scrape(server)["kunserve:replicas_alive{}"] == 1
    finally:
        server.stop()
