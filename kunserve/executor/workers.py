"""The control channel to worker processes: commands down a pipe each, replies back, and
faults seen at once (a worker's process sentinel wakes any wait). Every wait has a deadline
(EngineConfig.worker_timeout_s): a worker that does not answer in time is hung, and is killed.
A set of workers fails as one: a dead, failing or hung member stops them all, since their
pipeline state is lost. kunserve/executor/ray_executor.py carries the same commands as Ray
actor calls.
A set's workers are its stages' devices in order, `tp_size` consecutive ones per stage (a
tensor-parallel stage's ranks); each stage's first rank answers for it."""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn

from kunserve.worker.protocol import Command, Reply

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0  # how long a worker may take to exit before it is terminated
# How long a worker's error waits for another worker's exit to show: a peer's death often reaches
# the driver first as a link error of the worker that shares a collective with it.
PEER_EXIT_GRACE_S = 0.5
STOP_POLL_S = 0.1  # how often a wait that may be called off (a worker start) looks whether it was


class StartCancelled(RuntimeError):
    """A worker start was called off (the cluster is stopping); its workers are stopped."""


class WorkerDiedError(RuntimeError):
    """A worker process exited or failed; the steps in flight on it are lost."""


@dataclass
class WorkerHandle:
    process: BaseProcess
    conn: Connection
    global_rank: int  # its name among a cluster's workers (kunserve/executor/rendezvous.py)
    inbox: deque[tuple[str, Any]] = field(default_factory=deque)  # read, not yet asked for

    @property
    def name(self) -> str:
        return f"worker {self.global_rank} (pid {self.process.pid})"


def _first_of(inbox: deque[tuple[str, Any]], kind: str) -> int | None:
    return next((i for i, (k, _) in enumerate(inbox) if k == kind), None)


class WorkerSet:
    def __init__(self, handles: list[WorkerHandle], timeout_s: float, tp_size: int = 1) -> None:
        """`timeout_s`: how long a worker may take to answer (EngineConfig.worker_timeout_s);
        `tp_size`: the workers of each stage."""
        if len(handles) % tp_size:
            raise ValueError(f"tensor_parallel_size: {len(handles)} workers are not stages of {tp_size} ranks")
        self.handles = handles
        self.timeout_s = timeout_s
        self.tp_size = tp_size
        self.failure: str | None = None  # why the set failed; every later call raises it
        self._last_stage_busy_s = 0.0  # computed by the last stage, reported with its steps

    def __len__(self) -> int:
        return len(self.handles)

    @property
    def num_stages(self) -> int:
        return len(self.handles) // self.tp_size

    def stage_workers(self, stage: int) -> range:
        """The indices of stage `stage`'s workers (its tensor-parallel ranks, rank 0 first)."""
        return range(stage * self.tp_size, (stage + 1) * self.tp_size)

    def send(self, index: int, message: bytes) -> None:
        self._raise_if_failed()
        try:
            self.handles[index].conn.send_bytes(message)
        except OSError as error:
            self.fail(f"{self.handles[index].name} is unreachable ({error})")

    def post(self, index: int, command: str, argument: Any) -> None:
        self.send(index, pickle.dumps((command, argument), protocol=pickle.HIGHEST_PROTOCOL))

    def receive(self, index: int, expected: str, timeout_s: float | None = None,
                stop: threading.Event | None = None) -> Any:
        """The next message of kind `expected` from worker `index`, watching every worker of
        the set: one that dies or reports an error fails the call at once instead of leaving it
        waiting, and worker `index` is killed as hung unless it answers within `timeout_s`
        (None: the set's). StartCancelled once `stop` is set. Messages of one kind come in
        order; a device call's reply may pass a step's (a drop's KV exchange runs between a
        group's steps in flight: kunserve/cluster/exchange.py)."""
        self._raise_if_failed()
        handle = self.handles[index]
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while (position := _first_of(handle.inbox, expected)) is None:
            left_s = deadline - time.monotonic()
            if self._read_any(left_s if stop is None else min(left_s, STOP_POLL_S)):
                continue
            if stop is not None and stop.is_set():
                raise StartCancelled(f"{handle.name}: called off while it started")
            if time.monotonic() >= deadline:
                self.fail(f"{handle.name} did not answer within {timeout_s:g} s (worker_timeout_s): "
                          "killed as hung")
        _, payload = handle.inbox[position]
        del handle.inbox[position]
        return payload

    def receive_sampled(self) -> Any:
        """The last stage's answer to the oldest step (from its rank 0): its sampled tokens."""
        sampled, busy_s = self.receive(self.stage_workers(self.num_stages - 1)[0], Reply.SAMPLED)
        self._last_stage_busy_s += busy_s
        return sampled

    def take_busy_seconds(self) -> list[float]:
        """Seconds each stage computed since the last take (as its rank 0 counts them). The
        last stage reports with its steps; the others answer once the steps sent to them
        before this call have run."""
        firsts = [self.stage_workers(stage)[0] for stage in range(self.num_stages - 1)]
        for index in firsts:
            self.post(index, Command.TAKE_BUSY_S, None)
        taken = [self.receive(index, Reply.BUSY_S) for index in firsts]
        taken.append(self._last_stage_busy_s)
        self._last_stage_busy_s = 0.0
        return taken

    def _read_any(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` until any worker sends (its message goes to its inbox) or dies
        (the set fails); False when none did in time."""
        sentinels = {h.process.sentinel: h for h in self.handles}
        ready = wait([*(h.conn for h in self.handles), *sentinels], timeout=max(0.0, timeout_s))
        for other in self.handles:
            if other.conn in ready:
                kind, payload = self._recv(other)
                if kind == Reply.ERROR:
                    self.fail(self._exited_besides(other) or f"{other.name} failed:\n{payload}")
                other.inbox.append((kind, payload))
        for sentinel, other in sentinels.items():
            if sentinel in ready:
                other.process.join(SHUTDOWN_GRACE_S)  # it is gone: this only collects its exit code
                self.fail(f"{other.name} exited with code {other.process.exitcode}")
        return bool(ready)

    def _exited_besides(self, reporting: WorkerHandle) -> str | None:
        """Another worker than `reporting` that has exited, waited for up to PEER_EXIT_GRACE_S
        (its death, not the error it caused, is the failure to name)."""
        others = {h.process.sentinel: h for h in self.handles if h is not reporting}
        for sentinel in wait(list(others), timeout=PEER_EXIT_GRACE_S) if others else []:
            gone = others[sentinel]
            gone.process.join(SHUTDOWN_GRACE_S)  # it is gone: this only collects its exit code
            return f"{gone.name} exited with code {gone.process.exitcode}"
        return None

    def exited(self) -> str | None:
        """Which worker has exited, if any, seen without waiting (and without reading replies,
        which belong to whoever waits for them): a health check from another thread."""
        if self.failure is not None:
            return self.failure
        gone = wait([h.process.sentinel for h in self.handles], timeout=0)
        return next((f"{h.name} exited" for h in self.handles if h.process.sentinel in gone), None)

    def request_shutdown(self) -> None:
        """Ask every worker to exit, without waiting (see `shutdown`)."""
        for handle in self.handles:
            if handle.process.is_alive():
                try:
                    handle.conn.send((Command.SHUTDOWN, None))
                except OSError:
                    pass  # it is exiting anyway

    def shutdown(self) -> None:
        self.request_shutdown()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for handle in self.handles:
            handle.process.join(max(0.0, deadline - time.monotonic()))
        self._kill_all()  # what has not exited by now is hung (or stopped: only SIGKILL ends it)

    def fail(self, reason: str) -> NoReturn:
        """Stop every worker of the set at once and raise."""
        self.failure = reason
        logger.error("%s; stopping its workers", reason)
        self._kill_all()
        raise WorkerDiedError(reason)

    def _kill_all(self) -> None:
        for handle in self.handles:
            if handle.process.is_alive():
                handle.process.kill()
            handle.process.join()

    def _raise_if_failed(self) -> None:
        # A failed set's processes are gone: a wait on them would never end.
        if self.failure is not None:
            raise WorkerDiedError(self.failure)

    def _recv(self, handle: WorkerHandle) -> tuple[str, Any]:
        try:
            return handle.conn.recv()
        except (EOFError, OSError):
            handle.process.join(SHUTDOWN_GRACE_S)
            self.fail(f"{handle.name} exited with code {handle.process.exitcode}")
