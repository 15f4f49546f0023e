"""Faults on a live cluster, and recovery from them (issue 22), through the HTTP server.

Specified: a worker killed in replica mode, in a pipeline group, or during a drop or restore
ends the requests whose state it held within FAULT_S, and no request hangs; its replica (every
member of its group) restarts on new workers, and within RECOVERY_S the cluster serves the
tokens of an uninterrupted greedy run again, on every replica, each restarted one with every
stage it may become prepared before it serves (as at launch); the dead workers leave no
process behind, and the other replicas no link to them. A group's member killed while the
others hold its arena mapped fails the group's requests, none hangs. One tensor-parallel rank
of a replica killed fails that replica's requests alone: the replica restarts (all its ranks)
while the other serves its own to the end. A hung worker (SIGSTOP) is killed at
--worker-timeout-s: its requests fail within that plus FAULT_S, while the other replica
serves and an operator drop is refused instead of pausing it. A drop the layers cannot split
into is refused with 400 and the cluster serves on. Shutdown never waits on a hung worker, calls
off a restart whose new worker is still starting (no restart outlives it, no worker is left), and
every process of a server killed outright exits.

FAULT_S and RECOVERY_S are the issue's bounds: liveness (a death is seen at once, a hang at
its deadline; nothing waits on a longer timeout), not speed."""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.process
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from server_harness import MAX_MODEL_LEN, WAIT_S, RunningServer, process_gone, scrape, wait_until

from kunserve import LLM, SamplingParams
from kunserve.cluster import runner as runner_module
from kunserve.cluster.config import CoordinatorConfig
from kunserve.executor.base import WorkerExecutor
from kunserve.executor.multiproc import MultiprocExecutor
from kunserve.server.api_server import ServerConfig
from kunserve.worker.protocol import StageAssignment, WorkerWorld

FAULT_S = 5.0  # a killed worker's requests end within this; a hung one's within its deadline plus this
RECOVERY_S = 60.0  # the cluster serves correct tokens again within this of a fault, the restart included
HANG_TIMEOUT_S = 2.0  # --worker-timeout-s where a test hangs a worker
CHECK_TOKENS = 12
CHECK_PROMPTS = [[(7 * i + 13 * j) % 500 for j in range(6 + 11 * i)] for i in range(4)]
LONG = {"prompt": "Once upon a time", "max_tokens": MAX_MODEL_LEN - 16, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def reference(llama_dir: Path) -> list[str]:
    """The greedy texts of CHECK_PROMPTS in an uninterrupted run."""
    llm = LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN)
    outputs = llm.generate(CHECK_PROMPTS, SamplingParams(temperature=0.0, max_tokens=CHECK_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    return [out.outputs[0].text for out in outputs]


@dataclass
class Ended:
    status: int
    message: str
    at: float  # time.monotonic() when the response ended


class Traffic:
    """Requests posted at once, each on a thread of its own; one not answered within
    `timeout_s` ends as "no answer" (status 0): it hung."""

    def __init__(self, server: RunningServer, body: dict, count: int, timeout_s: float = RECOVERY_S) -> None:
        self.ended: list[Ended] = []
        self._threads = [threading.Thread(target=self._post, args=(server.url, body, timeout_s)) for _ in range(count)]
        for thread in self._threads:
            thread.start()

    def _post(self, url: str, body: dict, timeout_s: float) -> None:
        try:
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=timeout_s)
            message = response.json()["error"]["message"] if response.status_code != 200 else ""
            self.ended.append(Ended(response.status_code, message, time.monotonic()))
        except httpx.TimeoutException:
            self.ended.append(Ended(0, "no answer", time.monotonic()))

    def join(self) -> list[Ended]:
        for thread in self._threads:
            thread.join()
        return self.ended


class Servers:
    """Servers a test starts, and every worker process they had: stopped at the end even when
    the test fails, and then none of those workers may be left running (or stopped)."""

    def __init__(self) -> None:
        self.running: list[RunningServer] = []
        self.pids: set[int] = set()

    def start(self, llama_dir: Path, config: ServerConfig, **engine_args: object) -> RunningServer:
        server = RunningServer(llama_dir, config, worker_threads=1, **engine_args)
        self.running.append(server)
        self.note_workers(server)
        return server

    def note_workers(self, server: RunningServer) -> list[int]:
        """The server's worker pids now (restarted replicas have new ones)."""
        pids = worker_pids(server)
        self.pids.update(pids)
        return pids

    def stop(self, server: RunningServer) -> None:
        self.note_workers(server)
        self.running.remove(server)
        server.stop()

    def close(self) -> None:
        for server in list(self.running):
            for pid in self.pids:
                if not process_gone(pid):
                    os.kill(pid, signal.SIGCONT)  # a stopped worker must not outlive the test
            self.stop(server)
        wait_until(lambda: all(process_gone(pid) for pid in self.pids), "every worker to exit")


@pytest.fixture
def servers() -> Iterator[Servers]:
    started = Servers()
    yield started
    started.close()


def worker_pids(server: RunningServer) -> list[int]:
    executors = [engine.executor for engine in server.cluster.engines]
    assert all(isinstance(e, MultiprocExecutor) for e in executors)
    return [pid for e in executors for pid in e.worker_pids if pid is not None]  # type: ignore[attr-defined]


def serves_the_reference_again(server: RunningServer, reference: list[str], fault_at: float) -> None:
    """Every replica serving again within RECOVERY_S of the fault, and the greedy texts of an
    uninterrupted run from each (idle replicas take turns, so every replica serves some)."""
    deadline = fault_at + RECOVERY_S
    num_replicas = len(server.cluster.engines)
    while scrape(server)["kunserve:replicas_alive{}"] < num_replicas or server.cluster.coordinator.runner.groups:
        assert time.monotonic() < deadline, "the cluster did not recover in time"
        time.sleep(0.05)
    texts = []
    for _ in range(num_replicas):
        for prompt in CHECK_PROMPTS:
            body = {"prompt": prompt, "max_tokens": CHECK_TOKENS, "temperature": 0, "ignore_eos": True}
            response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=RECOVERY_S)
            assert response.status_code == 200, response.text
            texts.append(response.json()["choices"][0]["text"])
    assert time.monotonic() < deadline, "the cluster did not serve again in time"
    assert texts == reference * num_replicas
    print(f"correct greedy outputs from every replica {time.monotonic() - fault_at:.1f} s after the fault")


def failure_delays(ended: list[Ended], fault_at: float) -> list[float]:
    """How long after the fault each failed request ended (reported)."""
    failed = [e.at - fault_at for e in ended if e.status != 200]
    print(f"{len(failed)} failed request(s), the last {max(failed, default=0.0):.2f} s after the fault")
    return failed


def ended_within(ended: list[Ended], fault_at: float, bound_s: float) -> bool:
    """Whether every failed request ended within `bound_s` of the fault (reported either way)."""
    return all(delay < bound_s for delay in failure_delays(ended, fault_at))


# ---- a worker killed --------------------------------------------------------------------------


def test_a_worker_killed_in_replica_mode_ends_its_requests_and_its_replica_restarts(
    llama_dir: Path, reference: list[str], servers: Servers
) -> None:
    server = servers.start(llama_dir, ServerConfig(num_replicas=2, dispatch_policy="round_robin"))
    cluster = server.cluster
    assert cluster.links.are_open(0, 1)  # opened at launch: each maps the other's arena
    traffic = Traffic(server, LONG, 4)
    wait_until(lambda: [len(e.scheduler.running) for e in cluster.engines] == [2, 2], "two requests on each replica")
    victim = worker_pids(server)[0]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    ended = traffic.join()
    assert sorted(e.status for e in ended) == [200, 200, 500, 500]
    failed = [e for e in ended if e.status == 500]
    assert all("worker 0" in e.message and "exited" in e.message for e in failed)
    assert ended_within(ended, killed_at, FAULT_S)
    serves_the_reference_again(server, reference, killed_at)
    servers.note_workers(server)
    assert process_gone(victim)
    assert [t["kind"] for t in httpx.get(f"{server.url}/v1/cluster").json()["transitions"]] == ["restart"]
    assert [r["restarts"] for r in httpx.get(f"{server.url}/v1/cluster").json()["replicas"]] == [1, 0]
    assert scrape(server)["kunserve:replica_restarts_total{}"] == 1
    assert scrape(server)["kunserve:restores_total{}"] == 0
    assert not cluster.links.has_stale(1)  # the survivor let go of the dead worker's arena and link


def test_a_restarted_replica_has_every_stage_it_may_become_prepared_before_it_serves(
    llama_dir: Path, servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[WorkerExecutor, str, tuple]] = []
    original = WorkerExecutor.call

    def noting(executor: WorkerExecutor, rank: int, call: Callable, *args: object, **kwargs: object) -> object:
        calls.append((executor, call.__name__, args))
        return original(executor, rank, call, *args, **kwargs)

    monkeypatch.setattr(WorkerExecutor, "call", noting)
    server = servers.start(llama_dir, ServerConfig(num_replicas=2, dispatch_policy="round_robin"))
    old = server.cluster.engines[0].executor
    os.kill(worker_pids(server)[0], signal.SIGKILL)  # idle: the health check sees it
    wait_until(lambda: server.cluster.engines[0].executor is not old and server.cluster.num_alive == 2,
               "replica 0 to serve again")
    new = server.cluster.engines[0].executor
    assert [(name, args) for executor, name, args in calls if executor is new] == [("prepare_stages", ([2],))]


def test_a_worker_killed_in_a_group_ends_the_groups_requests_and_every_member_restarts(
    llama_dir: Path, reference: list[str], servers: Servers
) -> None:
    # Issue 22's report: 16 long requests overload two replicas of 64 blocks, grouped. The
    # group is an operator's drop: the kunserve policy now drops only where a group gains
    # decode throughput (min_drop_gain), which this CPU model's cost estimate does not show.
    server = servers.start(llama_dir, ServerConfig(num_replicas=2, coordinator=CoordinatorConfig("recompute")),
                           num_kv_blocks=64, max_model_len=384)
    runner = server.cluster.coordinator.runner
    assert httpx.post(f"{server.url}/v1/cluster/drop", json={}, timeout=WAIT_S).status_code == 200
    traffic = Traffic(server, {**LONG, "max_tokens": 250}, 16)
    wait_until(lambda: bool(runner.groups) and bool(runner.groups[0].engine.scheduler.running), "the group stepping")
    old_pids = worker_pids(server)
    killed_at = time.monotonic()
    os.kill(old_pids[1], signal.SIGKILL)
    ended = traffic.join()
    assert len(ended) == 16 and all(e.status in (200, 500) for e in ended)
    assert ended_within(ended, killed_at, FAULT_S)
    serves_the_reference_again(server, reference, killed_at)
    servers.note_workers(server)
    assert all(process_gone(pid) for pid in old_pids)
    assert dict(runner.restarts) == {0: 1, 1: 1}


def test_a_member_killed_while_the_other_maps_its_arena_fails_the_groups_requests_and_none_hangs(
    llama_dir: Path, reference: list[str], servers: Servers
) -> None:
    # Issue 24: links (mapped arenas) open at launch must not let a dead peer hang the
    # survivor. A short deadline: were the death missed, the survivor would be killed at it.
    server = servers.start(llama_dir, ServerConfig(num_replicas=2, coordinator=CoordinatorConfig("recompute")),
                           worker_timeout_s=HANG_TIMEOUT_S)
    assert server.cluster.links.are_open(0, 1)  # each has the other's arena mapped since launch
    assert httpx.post(f"{server.url}/v1/cluster/drop", json={}, timeout=WAIT_S).status_code == 200
    traffic = Traffic(server, LONG, 4, timeout_s=WAIT_S)  # an answer later than WAIT_S: a hang
    wait_until(lambda: httpx.get(f"{server.url}/v1/cluster").json()["groups"][0]["running"] == 4,
               "the group running every request")
    old_pids = worker_pids(server)
    killed_at = time.monotonic()
    os.kill(old_pids[0], signal.SIGKILL)  # stage 0: stage 1 waits on its activations
    ended = traffic.join()
    assert [e.status for e in ended] == [500] * 4, [e.message for e in ended]
    assert all("worker 0" in e.message and "exited" in e.message for e in ended)
    failure_delays(ended, killed_at)
    serves_the_reference_again(server, reference, killed_at)
    servers.note_workers(server)
    assert all(process_gone(pid) for pid in old_pids)
    assert dict(server.cluster.coordinator.runner.restarts) == {0: 1, 1: 1}


def test_a_tensor_parallel_rank_killed_fails_its_replicas_requests_alone_and_the_replica_restarts(
    llama_dir: Path, reference: list[str], servers: Servers
) -> None:
    server = servers.start(llama_dir, ServerConfig(num_replicas=2, dispatch_policy="round_robin"),
                           tensor_parallel_size=2)
    cluster = server.cluster
    pids = worker_pids(server)
    assert len(pids) == 4  # two replicas of two ranks each
    other_replicas_pids = pids[2:]
    traffic = Traffic(server, LONG, 4)
    wait_until(lambda: [len(e.scheduler.running) for e in cluster.engines] == [2, 2], "two requests on each replica")
    killed_at = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)  # replica 0's rank 1, which samples nothing: rank 0 waits on it in collectives
    ended = traffic.join()
    assert sorted(e.status for e in ended) == [200, 200, 500, 500]
    assert all("worker 1" in e.message and "exited" in e.message for e in ended if e.status == 500)
    failure_delays(ended, killed_at)
    serves_the_reference_again(server, reference, killed_at)
    new_pids = servers.note_workers(server)
    assert process_gone(pids[0]) and process_gone(pids[1])  # the whole replica restarted
    assert new_pids[2:] == other_replicas_pids  # the other one never stopped
    assert [r["restarts"] for r in httpx.get(f"{server.url}/v1/cluster").json()["replicas"]] == [1, 0]
    assert not cluster.links.has_stale(1)  # replica 1's ranks let go of both dead ranks' arenas and links


@pytest.mark.parametrize("transition", ["drop", "restore"])
def test_a_worker_killed_during_a_transition_ends_the_members_requests_and_they_restart(
    llama_dir: Path, reference: list[str], servers: Servers, monkeypatch: pytest.MonkeyPatch,
    transition: str
) -> None:
    # Requests far longer than the transition: none may end on its own before the kill.
    server = servers.start(llama_dir, ServerConfig(num_replicas=2, dispatch_policy="round_robin",
                                                    coordinator=CoordinatorConfig("recompute")),
                           max_model_len=4 * MAX_MODEL_LEN)
    if transition == "restore":
        assert httpx.post(f"{server.url}/v1/cluster/drop", json={}, timeout=WAIT_S).status_code == 200
    old_pids = worker_pids(server)
    killed_at = 0.0
    carry_out = getattr(runner_module, "fuse" if transition == "drop" else "split")

    def kill_then_carry_out(*args: object) -> object:
        nonlocal killed_at
        killed_at = time.monotonic()
        os.kill(old_pids[1], signal.SIGKILL)
        return carry_out(*args)

    monkeypatch.setattr(runner_module, carry_out.__name__, kill_then_carry_out)
    runner = server.cluster.coordinator.runner
    traffic = Traffic(server, {**LONG, "max_tokens": 4 * MAX_MODEL_LEN - 16}, 4)
    wait_until(lambda: sum({id(e): len(e.scheduler.running) for e in map(runner.engine_of, (0, 1))}.values()) == 4,
               "every request running")
    answer = httpx.post(f"{server.url}/v1/cluster/{transition}", json={}, timeout=WAIT_S)
    assert answer.status_code >= 500 and "worker 1" in answer.text
    ended = traffic.join()
    assert all(e.status == 500 for e in ended) and ended_within(ended, killed_at, FAULT_S)
    serves_the_reference_again(server, reference, killed_at)
    servers.note_workers(server)
    assert all(process_gone(pid) for pid in old_pids)


def test_a_restarted_replicas_workers_log_under_its_own_index_with_their_new_ranks() -> None:
    # Two replicas of 2 devices took ranks 0-3; replica 0 restarted takes 4-5.
    restarted = WorkerWorld("127.0.0.1:1", first_rank=4, link_timeout_s=1.0, replica=0)
    stage = StageAssignment(0, 1, (0, 4), "cpu", restarted, logical_block_ids=False, tp_rank=1, tp_size=2)
    assert stage.log_name == "worker[replica 0 stage 0 tp 1 rank 5]"
    alone = StageAssignment(0, 1, (0, 4), "cpu", None, logical_block_ids=False)
    assert alone.log_name == "worker[replica 0 stage 0 rank 0]"


# ---- a worker hung ----------------------------------------------------------------------------


def test_a_hung_worker_is_killed_at_its_deadline_while_the_other_replica_serves(
    llama_dir: Path, reference: list[str], servers: Servers
) -> None:
    # Requests long enough that replica 0 still runs its own through replica 1's hang.
    server = servers.start(llama_dir, ServerConfig(num_replicas=2, dispatch_policy="round_robin"),
                           worker_timeout_s=HANG_TIMEOUT_S, max_model_len=4 * MAX_MODEL_LEN)
    cluster = server.cluster
    traffic = Traffic(server, {**LONG, "max_tokens": 4 * MAX_MODEL_LEN - 16}, 4)
    wait_until(lambda: [len(e.scheduler.running) for e in cluster.engines] == [2, 2], "two requests on each replica")
    victim = worker_pids(server)[1]  # the drop below pauses replica 0 first
    tokens = "vllm:generation_tokens_total{}"
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    served_before = scrape(server, engine=0)[tokens]
    drop = httpx.post(f"{server.url}/v1/cluster/drop", json={"replicas": [0, 1]}, timeout=WAIT_S)
    dropped_at = time.monotonic()
    served_meanwhile = scrape(server, engine=0)[tokens] - served_before
    ended = traffic.join()
    assert drop.status_code == 409 and "not serving" in drop.text  # refused once the hung worker was killed
    assert dropped_at - stopped_at < HANG_TIMEOUT_S + FAULT_S
    assert served_meanwhile > 0  # replica 0 went on while replica 1 hung (the drop did not hold it meanwhile)
    failed = [e for e in ended if e.status != 200]
    assert len(failed) == 2 and all("worker 1" in e.message and "did not answer within 2 s" in e.message
                                    for e in failed)
    assert ended_within(ended, stopped_at, HANG_TIMEOUT_S + FAULT_S)
    serves_the_reference_again(server, reference, stopped_at)
    servers.note_workers(server)
    assert process_gone(victim)


class Loop:
    """A replica loop that notes, when it is asked to pause, which others are paused then."""

    def __init__(self, paused: set[str], name: str) -> None:
        self.paused, self.name = paused, name
        self.others_paused_when_asked: list[set[str]] = []

    def pause(self) -> None:
        self.others_paused_when_asked.append(set(self.paused))  # held while this one's step ends
        self.paused.add(self.name)

    def resume(self) -> None:
        self.paused.discard(self.name)


def test_a_transition_holds_no_replica_while_it_waits_for_another_to_be_between_steps() -> None:
    paused: set[str] = set()
    healthy, hung = Loop(paused, "healthy"), Loop(paused, "hung")
    runner_module.pause_together([healthy, hung])  # type: ignore[list-item]
    assert hung.others_paused_when_asked[0] == set()  # its first pause may last until its deadline
    assert paused == {"healthy", "hung"}


def test_shutdown_ends_the_requests_and_does_not_wait_for_a_hung_worker(llama_dir: Path, servers: Servers) -> None:
    server = servers.start(llama_dir, ServerConfig(num_replicas=2, dispatch_policy="round_robin"))
    traffic = Traffic(server, LONG, 2)
    wait_until(lambda: all(e.scheduler.running for e in server.cluster.engines), "a request on each replica")
    victim = worker_pids(server)[0]
    os.kill(victim, signal.SIGSTOP)  # the default deadline (120 s) is far off
    stopping = threading.Thread(target=server.cluster.shutdown)  # what the server does on SIGTERM
    stopping.start()
    stopping.join(WAIT_S)
    assert not stopping.is_alive(), "shutdown waited on the hung worker"
    ended = traffic.join()
    assert [e.status for e in ended] == [500, 500] and all("shutting down" in e.message for e in ended)
    assert all(process_gone(pid) for pid in servers.pids)


def test_shutdown_calls_off_a_restart_whose_new_worker_is_still_starting(llama_dir: Path, servers: Servers) -> None:
    server = servers.start(llama_dir, ServerConfig(num_replicas=2, dispatch_policy="round_robin"))
    first = set(worker_pids(server))
    os.kill(worker_pids(server)[0], signal.SIGKILL)  # idle replica: the health check sees it, a restart begins
    wait_until(lambda: new_worker(first) is not None, "the restart's new worker process")
    starting = new_worker(first)
    assert starting is not None and starting.pid is not None
    os.kill(starting.pid, signal.SIGSTOP)  # it never reports ready (the start's deadline is 900 s off)
    servers.pids.add(starting.pid)
    stopping = threading.Thread(target=server.cluster.shutdown)
    stopping.start()
    stopping.join(WAIT_S)
    assert not stopping.is_alive()
    assert not server.cluster.recovery.is_alive, "the restart outlived the shutdown"
    assert process_gone(starting.pid)


def test_shutdown_calls_off_a_restart_whose_new_worker_is_preparing_its_stages(
    llama_dir: Path, servers: Servers
) -> None:
    server = servers.start(llama_dir, ServerConfig(num_replicas=2, dispatch_policy="round_robin"))
    cluster = server.cluster
    preparing: list[int] = []
    prepare = cluster._prepare_stages

    def hung_when_restarting(executor: WorkerExecutor, num_replicas: int, purpose: str) -> None:
        if purpose == "restart":  # the new worker stops answering (the call's deadline is minutes off)
            preparing.extend(pid for pid in executor.worker_pids if pid is not None)
            for pid in preparing:
                os.kill(pid, signal.SIGSTOP)
        prepare(executor, num_replicas, purpose)

    cluster._prepare_stages = hung_when_restarting  # type: ignore[method-assign]
    os.kill(worker_pids(server)[0], signal.SIGKILL)  # idle replica: the health check sees it, a restart begins
    wait_until(lambda: bool(preparing), "the restart's new worker preparing its stages")
    servers.pids.update(preparing)
    stopping = threading.Thread(target=cluster.shutdown)
    stopping.start()
    stopping.join(WAIT_S)
    assert not stopping.is_alive()
    assert not cluster.recovery.is_alive, "the restart outlived the shutdown"
    assert all(process_gone(pid) for pid in preparing)


def new_worker(known: set[int]) -> multiprocessing.process.BaseProcess | None:
    """A worker process of this test's that is not one of `known`."""
    return next((p for p in multiprocessing.active_children()
                 if p.name.startswith("kunserve-worker") and p.pid not in known), None)


# ---- an operator's mistake --------------------------------------------------------------------


def test_a_drop_the_layers_cannot_split_into_is_refused_and_the_cluster_serves_on(
    llama_dir: Path, reference: list[str], servers: Servers
) -> None:
    server = servers.start(llama_dir, ServerConfig(num_replicas=3, dispatch_policy="round_robin"))
    answer = httpx.post(f"{server.url}/v1/cluster/drop", json={"replicas": [0, 1, 2]}, timeout=WAIT_S)
    assert answer.status_code == 400 and "divide" in answer.json()["error"]["message"]
    state = httpx.get(f"{server.url}/v1/cluster").json()
    assert [(r["mode"], r["alive"]) for r in state["replicas"]] == [("replica", True)] * 3
    serves_the_reference_again(server, reference, time.monotonic())


# ---- the server killed ------------------------------------------------------------------------


def test_every_process_of_a_server_killed_after_a_worker_exits(llama_dir: Path) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "kunserve.cli", "serve", str(llama_dir), "--replicas", "2", "--host", "127.0.0.1",
         "--port", "0", "--max-model-len", str(MAX_MODEL_LEN), "--worker-threads", "1"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    descendants: list[int] = []
    try:
        url = _server_url(server)
        # Grouped, with steps in flight: one stage waits on the other when the driver goes.
        assert httpx.post(f"{url}/v1/cluster/drop", json={}, timeout=WAIT_S).status_code == 200
        traffic = threading.Thread(target=_post_until_killed, args=(f"{url}/v1/completions",))
        traffic.start()
        wait_until(lambda: httpx.get(f"{url}/v1/cluster").json()["groups"][0]["running"] == 1, "the group stepping")
        descendants = _descendants(server.pid)
        # Workers are forked from the server's forkserver (kunserve/executor/multiproc.py).
        forkservers = [pid for pid in _children(server.pid) if "forkserver" in _cmdline(pid)]
        workers = sorted(pid for forkserver in forkservers for pid in _children(forkserver))
        assert len(workers) == 2
        # The case: a worker dies (the first started: likely stage 0, which the other
        # stage waits on), then the server is killed.
        os.kill(workers[0], signal.SIGKILL)
        server.kill()
        server.wait()
        traffic.join()
        wait_until(lambda: all(process_gone(pid) for pid in descendants), "the killed server's processes to exit")
    finally:
        server.kill()
        for pid in descendants:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)


def _server_url(server: subprocess.Popen) -> str:
    """The URL the server logs once it serves, read within RECOVERY_S (a server that never
    logs it fails the test instead of blocking it)."""
    found: list[str] = []

    def read() -> None:
        assert server.stderr is not None
        for line in server.stderr:
            if match := re.search(r"serving \S+ on (http://\S+)", line):
                found.append(match.group(1))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(RECOVERY_S)
    assert found, "the server never logged where it serves"
    return found[0]


def _post_until_killed(url: str) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
        httpx.post(url, json=LONG, timeout=WAIT_S)


def _children(pid: int) -> list[int]:
    return [int(child) for task in os.listdir(f"/proc/{pid}/task")
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]


def _descendants(pid: int) -> list[int]:
    children = _children(pid)
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except FileNotFoundError:
        return ""
