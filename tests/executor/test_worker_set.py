"""The control channel to worker processes.

Specified: a worker that exits fails the set with its exit code, even when another worker's error
(its link to the dead one) reaches the driver first; after that every call on
the set raises the same failure at once instead of waiting on processes that are gone; a
worker that does not answer within the deadline is killed and fails the set as hung; a wait
given a stop event ends with StartCancelled once it is set (a cluster stopping during a
restart), its deadline kept otherwise; calls
that redo a start's work (weights read from the checkpoint, the arena moved into shared memory,
stage models built) wait as long as a start, the others a step's deadline; a worker whose
driver is gone exits even while its main thread is blocked."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import pytest
from server_harness import process_gone

from kunserve.executor.workers import StartCancelled, WorkerDiedError, WorkerHandle, WorkerSet
from kunserve.worker.protocol import Command, DeviceCalls, takes_start_deadline
from kunserve.worker.worker_process import watch_driver

LIVENESS_S = 60.0  # a bound for what must happen, not a timing
DEADLINE_S = 0.5  # the set's deadline in the hang test


def silent_worker(conn: Connection, seconds: float) -> None:
    """Holds its end of the pipe and answers nothing for `seconds`, then exits."""
    time.sleep(seconds)


def failing_worker(conn: Connection, started: EventType, reported: EventType) -> None:
    """Once its peer runs, reports an error (as a worker whose collective lost its peer does),
    then lets the peer exit."""
    started.wait(LIVENESS_S)
    conn.send(("error", "Connection closed by peer"))
    reported.set()
    time.sleep(LIVENESS_S)


def exiting_worker(conn: Connection, started: EventType, reported: EventType) -> None:
    """Dies (no interpreter teardown, as when killed) just after the other worker's error is on
    its way: the driver may see that first."""
    started.set()
    reported.wait(LIVENESS_S)
    os._exit(3)


def worker_set(target: object, args: tuple, timeout_s: float = LIVENESS_S) -> WorkerSet:
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=target, args=(child, *args), daemon=True)
    process.start()
    child.close()
    return WorkerSet([WorkerHandle(process, parent, global_rank=0)], timeout_s)


def exited_worker_set() -> WorkerSet:
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=sys.exit, args=(3,), daemon=True)
    process.start()
    child.close()
    return WorkerSet([WorkerHandle(process, parent, global_rank=0)], LIVENESS_S)


def test_a_worker_that_exits_fails_the_wait_with_its_exit_code() -> None:
    workers = exited_worker_set()
    with pytest.raises(WorkerDiedError, match="exited with code 3"):
        workers.receive(0, "returned")


def test_a_peers_exit_seen_just_after_another_workers_error_is_named_as_the_failure() -> None:
    context = mp.get_context("spawn")
    started, reported = context.Event(), context.Event()
    handles = []
    for rank, target in enumerate([exiting_worker, failing_worker]):
        parent, child = context.Pipe()
        process = context.Process(target=target, args=(child, started, reported), daemon=True)
        process.start()
        child.close()
        handles.append(WorkerHandle(process, parent, global_rank=rank))
    workers = WorkerSet(handles, LIVENESS_S)
    with pytest.raises(WorkerDiedError, match="worker 0 .* exited with code 3"):
        workers.receive(1, "returned")


def test_a_failed_set_refuses_later_calls_at_once() -> None:
    workers = exited_worker_set()
    with pytest.raises(WorkerDiedError):
        workers.receive(0, "returned")
    with pytest.raises(WorkerDiedError, match="exited with code 3"):
        workers.post(0, Command.CALL, ("weight_digests", (), {}))
    with pytest.raises(WorkerDiedError, match="exited with code 3"):
        workers.receive(0, "returned")


def test_a_worker_that_does_not_answer_in_time_is_killed_as_hung() -> None:
    workers = worker_set(silent_worker, (LIVENESS_S,), timeout_s=DEADLINE_S)
    process = workers.handles[0].process
    with pytest.raises(WorkerDiedError, match="did not answer within 0.5 s"):
        workers.receive(0, "returned")
    assert not process.is_alive() and process.exitcode == -signal.SIGKILL


def test_a_wait_may_be_given_a_longer_deadline_than_the_sets() -> None:
    workers = worker_set(silent_worker, (2 * DEADLINE_S,), timeout_s=DEADLINE_S)
    with pytest.raises(WorkerDiedError, match="exited with code 0"):
        workers.receive(0, "ready", timeout_s=LIVENESS_S)


def test_a_wait_that_may_be_called_off_ends_once_it_is_and_leaves_the_worker_alone() -> None:
    workers = worker_set(silent_worker, (LIVENESS_S,))
    stop = threading.Event()
    threading.Timer(DEADLINE_S, stop.set).start()
    with pytest.raises(StartCancelled):
        workers.receive(0, "ready", stop=stop)  # its deadline (LIVENESS_S) is far off
    assert workers.handles[0].process.is_alive() and workers.failure is None  # stopping it is the caller's
    workers.shutdown()


def test_a_wait_that_may_be_called_off_still_has_its_deadline() -> None:
    workers = worker_set(silent_worker, (LIVENESS_S,), timeout_s=DEADLINE_S)
    with pytest.raises(WorkerDiedError, match="did not answer within 0.5 s"):
        workers.receive(0, "ready", stop=threading.Event())


def test_calls_that_redo_a_starts_work_have_the_starts_deadline_and_the_others_a_steps() -> None:
    def start_deadline(call: object, *args: object) -> bool:
        return takes_start_deadline(call.__name__, args, {})  # type: ignore[attr-defined]

    assert start_deadline(DeviceCalls.reclaim_layer, 3)
    assert start_deadline(DeviceCalls.become_replica, None)  # refilled from the checkpoint
    assert start_deadline(DeviceCalls.export_arena)
    assert start_deadline(DeviceCalls.prepare_stages, [2])
    assert not start_deadline(DeviceCalls.become_replica, {0: 5})  # refilled from a peer
    assert not start_deadline(DeviceCalls.pull_kv, 5, [0], [1])
    assert not start_deadline(DeviceCalls.release_layer, 3)


ORPHAN_SCRIPT = f"""
import multiprocessing as mp, os, time
from {watch_driver.__module__} import watch_driver

def blocked(driver_pid):
    watch_driver(driver_pid)
    print(os.getpid(), flush=True)
    time.sleep(600)  # the main thread never looks at the driver

if __name__ == "__main__":
    child = mp.get_context("spawn").Process(target=blocked, args=(os.getpid(),))
    child.start()
    child.join()  # the driver exits (and the test fails on its empty output) if the child fails
"""


def test_a_worker_exits_when_its_driver_is_killed_even_while_blocked(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(ORPHAN_SCRIPT)
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert driver.stdout is not None
    worker_pid = int(driver.stdout.readline())
    try:
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + LIVENESS_S
        while not process_gone(worker_pid):
            assert time.monotonic() < deadline, "the orphaned worker is still running"
            time.sleep(0.05)
    finally:
        if not process_gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
