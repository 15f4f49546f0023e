"""The control channel to worker processes: commands down a pipe each, replies back, and
faults seen at once (a worker's process sentinel wakes any wait). A set of workers fails
as one: a dead or failing member stops them all, since their pipeline state is lost."""

from __future__ import annotations

import logging
import pickle
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0  # how long a worker may take to exit before it is terminated


class WorkerDiedError(RuntimeError):
    """A worker process exited or failed; the steps in flight on it are lost."""


@dataclass
class WorkerHandle:
    process: BaseProcess
    conn: Connection
    global_rank: int  # in the cluster's torch.distributed world
    inbox: deque[tuple[str, Any]] = field(default_factory=deque)  # read, not yet asked for

    @property
    def name(self) -> str:
        return f"worker {self.global_rank} (pid {self.process.pid})"


class WorkerSet:
    def __init__(self, handles: list[WorkerHandle]) -> None:
        self.handles = handles

    def __len__(self) -> int:
        return len(self.handles)

    def send(self, index: int, message: bytes) -> None:
        try:
            self.handles[index].conn.send_bytes(message)
        except OSError as error:
            self.fail(f"{self.handles[index].name} is unreachable ({error})")

    def post(self, index: int, command: str, argument: Any) -> None:
        self.send(index, pickle.dumps((command, argument), protocol=pickle.HIGHEST_PROTOCOL))

    def receive(self, index: int, expected: str) -> Any:
        """The next message of worker `index`, watching every worker of the set: one that
        dies or reports an error fails the call at once instead of leaving it waiting."""
        handle = self.handles[index]
        sentinels = {h.process.sentinel: h for h in self.handles}
        while not handle.inbox:
            ready = wait([*(h.conn for h in self.handles), *sentinels])
            for other in self.handles:
                if other.conn in ready:
                    kind, payload = self._recv(other)
                    if kind == "error":
                        self.fail(f"{other.name} failed:\n{payload}")
                    other.inbox.append((kind, payload))
            for sentinel, other in sentinels.items():
                if sentinel in ready:
                    self.fail(f"{other.name} exited with code {other.process.exitcode}")
        kind, payload = handle.inbox.popleft()
        if kind != expected:
            self.fail(f"{handle.name} sent {kind!r} where {expected!r} was due")
        return payload

    def request_shutdown(self) -> None:
        """Ask every worker to exit, without waiting (see `shutdown`)."""
        for handle in self.handles:
            if handle.process.is_alive():
                try:
                    handle.conn.send(("shutdown", None))
                except OSError:
                    pass  # it is exiting anyway

    def shutdown(self) -> None:
        self.request_shutdown()
        for handle in self.handles:
            handle.process.join(SHUTDOWN_GRACE_S)
            if handle.process.is_alive():
                handle.process.terminate()
                handle.process.join()

    def fail(self, reason: str) -> NoReturn:
        """Stop every worker of the set at once and raise."""
        logger.error("%s; stopping its workers", reason)
        for handle in self.handles:
            if handle.process.is_alive():
                handle.process.kill()
            handle.process.join()
        raise WorkerDiedError(reason)

    def _recv(self, handle: WorkerHandle) -> tuple[str, Any]:
        try:
            return handle.conn.recv()
        except (EOFError, OSError):
            handle.process.join(SHUTDOWN_GRACE_S)
            self.fail(f"{handle.name} exited with code {handle.process.exitcode}")
