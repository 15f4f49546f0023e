"""The control channel to worker processes.

Specified: a worker that exits fails the set with its exit code; after that every call on
the set raises the same failure at once instead of waiting on processes that are gone."""

from __future__ import annotations

import multiprocessing as mp
import sys

import pytest

from kunserve.executor.workers import WorkerDiedError, WorkerHandle, WorkerSet
from kunserve.worker.protocol import Command


def exited_worker_set() -> WorkerSet:
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=sys.exit, args=(3,), daemon=True)
    process.start()
    child.close()
    return WorkerSet([WorkerHandle(process, parent, global_rank=0)])


def test_a_worker_that_exits_fails_the_wait_with_its_exit_code() -> None:
    workers = exited_worker_set()
    with pytest.raises(WorkerDiedError, match="exited with code 3"):
        workers.receive(0, "returned")


def test_a_failed_set_refuses_later_calls_at_once() -> None:
    workers = exited_worker_set()
    with pytest.raises(WorkerDiedError):
        workers.receive(0, "returned")
    with pytest.raises(WorkerDiedError, match="exited with code 3"):
        workers.post(0, Command.CALL, ("weight_digests", (), {}))
    with pytest.raises(WorkerDiedError, match="exited with code 3"):
        workers.receive(0, "returned")
