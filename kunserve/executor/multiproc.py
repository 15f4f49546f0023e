"""One model over worker processes: a single device, or a pipeline group of g devices with
stage r holding layers [r·L/g, (r+1)·L/g) and g micro-batches in flight.

A worker that dies is noticed at once (its process sentinel wakes the wait for results):
the step fails with WorkerDiedError naming it, and the remaining workers are stopped.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import pickle
import socket
from collections import deque
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn

import numpy as np

from kunserve.config import EngineConfig
from kunserve.executor.base import Executor
from kunserve.layout import ArenaLayout
from kunserve.model.presets import ResolvedModel
from kunserve.step import StepInput
from kunserve.worker.worker_process import StageAssignment, WorkerWorld, worker_main

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0  # how long a worker may take to exit before it is terminated


class WorkerDiedError(RuntimeError):
    """A worker process exited or failed; the steps in flight on it are lost."""


def pipeline_stage_ranges(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Stage r's layers [r·L/g, (r+1)·L/g), floored: uneven when g does not divide L."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"pipeline_parallel_size: must be in [1, {num_layers}] (the layers), got {num_stages}")
    bounds = [r * num_layers // num_stages for r in range(num_stages + 1)]
    return list(itertools.pairwise(bounds))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, model: ResolvedModel, world: WorkerWorld | None = None) -> None:
        """`world`: the cluster's shared world; None: a world of this executor's stages alone."""
        num_stages = config.pipeline_parallel_size
        self.max_in_flight = num_stages
        context = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        world = world or WorkerWorld(f"tcp://127.0.0.1:{free_port()}", num_stages)
        self._world = world
        self._processes: list[BaseProcess] = []
        self._conns: list[Connection] = []
        for rank, layers in enumerate(pipeline_stage_ranges(model.spec.num_layers, num_stages)):
            stage = StageAssignment(rank, num_stages, layers, str(config.stage_device(rank)), world,
                                    logical_block_ids=num_stages > 1)
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(config, model, stage, child), name=f"kunserve-worker{rank}",
                                      daemon=True)
            process.start()
            child.close()
            self._processes.append(process)
            self._conns.append(parent)
        self._inboxes: list[deque[tuple[str, Any]]] = [deque() for _ in self._conns]  # read, not yet due
        try:
            layouts: list[ArenaLayout] = [self._receive(rank, "ready") for rank in range(num_stages)]
        except BaseException:
            self.shutdown()
            raise
        self._layout = layouts[0]
        if num_stages == 1:
            self._kv_block_ids = layouts[0].initial_kv_blocks()
        else:
            self._kv_block_ids = range(min(layout.num_initial_kv_blocks for layout in layouts))
        logger.info("%d worker process(es) ready, pids %s", num_stages, [p.pid for p in self._processes])

    @property
    def layout(self) -> ArenaLayout:
        return self._layout

    @property
    def worker_pids(self) -> list[int | None]:
        return [process.pid for process in self._processes]

    def kv_block_ids(self) -> range:
        return self._kv_block_ids

    def submit(self, step: StepInput) -> None:
        message = pickle.dumps(("execute", step), protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self._conns):
            self._send_bytes(rank, conn, message)

    def collect(self) -> np.ndarray:
        return self._receive(len(self._conns) - 1, "sampled")

    def release_layer(self, layer: int) -> range:
        return self._single_stage_call("release", layer, "released")

    def reclaim_layer(self, layer: int) -> None:
        self._single_stage_call("reclaim", layer, "reclaimed")

    @property
    def global_ranks(self) -> list[int]:
        """Each stage's rank in the cluster's torch.distributed world."""
        return [self._world.first_rank + rank for rank in range(len(self._conns))]

    def post(self, rank: int, name: str, *args: Any) -> None:
        """Start a named call on stage `rank`'s worker (see WORKER_CALLS); `result` collects it.
        Posting first and collecting later lets two workers run the two ends of a transfer."""
        self._send_bytes(rank, self._conns[rank], pickle.dumps(("call", (name, args))))

    def result(self, rank: int) -> Any:
        return self._receive(rank, "returned")

    def call(self, rank: int, name: str, *args: Any) -> Any:
        self.post(rank, name, *args)
        return self.result(rank)

    def start_busy_clocks(self) -> None:
        """Start timing each stage's compute (for the pipeline bubble; see BusyClock)."""
        for rank, conn in enumerate(self._conns):
            self._send_bytes(rank, conn, pickle.dumps(("busy_clock_start", None)))

    def stop_busy_clocks(self) -> list[float]:
        """Seconds each stage computed since `start_busy_clocks` (call with nothing in flight)."""
        for rank, conn in enumerate(self._conns):
            self._send_bytes(rank, conn, pickle.dumps(("busy_clock_stop", None)))
        return [self._receive(rank, "busy_s") for rank in range(len(self._conns))]

    def shutdown(self) -> None:
        for rank, conn in enumerate(self._conns):
            if self._processes[rank].is_alive():
                try:
                    conn.send(("shutdown", None))
                except OSError:
                    pass  # it is exiting anyway
        for process in self._processes:
            process.join(SHUTDOWN_GRACE_S)
            if process.is_alive():
                process.terminate()
                process.join()

    # ---- the control channel --------------------------------------------------------------------

    def _single_stage_call(self, command: str, argument: int, reply: str) -> Any:
        if len(self._conns) > 1:
            raise RuntimeError(f"{command}: a static pipeline group does not drop layers; replicas do")
        self._send_bytes(0, self._conns[0], pickle.dumps((command, argument)))
        return self._receive(0, reply)

    def _send_bytes(self, rank: int, conn: Connection, message: bytes) -> None:
        try:
            conn.send_bytes(message)
        except OSError as error:
            self._fail(f"worker {rank} is unreachable ({error})")

    def _receive(self, rank: int, expected: str) -> Any:
        """The next message of worker `rank`, watching every worker: one that dies or reports
        an error fails the call at once instead of leaving it waiting forever."""
        sentinels = {p.sentinel: r for r, p in enumerate(self._processes)}
        while not self._inboxes[rank]:
            ready = wait([*self._conns, *sentinels])
            for other, conn in enumerate(self._conns):
                if conn in ready:
                    kind, payload = self._recv(other, conn)
                    if kind == "error":
                        self._fail(f"worker {other} failed:\n{payload}")
                    self._inboxes[other].append((kind, payload))
            for sentinel, other in sentinels.items():
                if sentinel in ready:
                    process = self._processes[other]
                    self._fail(f"worker {other} (pid {process.pid}) exited with code {process.exitcode}")
        kind, payload = self._inboxes[rank].popleft()
        if kind != expected:
            self._fail(f"worker {rank} sent {kind!r} where {expected!r} was due")
        return payload

    def _recv(self, rank: int, conn: Connection) -> tuple[str, Any]:
        try:
            return conn.recv()
        except (EOFError, OSError):
            process = self._processes[rank]
            process.join(SHUTDOWN_GRACE_S)
            self._fail(f"worker {rank} (pid {process.pid}) exited with code {process.exitcode}")

    def _fail(self, reason: str) -> NoReturn:
        """Stop every worker of this executor at once (their pipeline state is lost) and raise."""
        logger.error("%s; stopping this executor's workers", reason)
        for process in self._processes:
            if process.is_alive():
                process.kill()
            process.join()
        raise WorkerDiedError(reason)
