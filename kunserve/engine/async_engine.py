"""The engine on its own thread, for a server: the asyncio side adds requests and reads
their outputs as async streams, while the loop thread runs steps back to back, so HTTP
work never waits for a step and a step never waits for HTTP."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Sequence as Seq

from typing_extensions import Self

from kunserve.engine.llm_engine import LLMEngine, PromptInput
from kunserve.engine.sequence import Sequence
from kunserve.outputs import RequestOutput
from kunserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """The waiting queue is at its limit: the client should retry later."""


class EngineDeadError(RuntimeError):
    """A step failed; the engine accepts no more requests."""


class RequestStream:
    """The outputs of one or more requests added together, in the order they are produced.
    Iteration ends when all of them finished, or when the stream is closed; closing aborts
    the unfinished ones (a client that went away)."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self._engine = engine
        self._unfinished = set(request_ids)
        self._queue: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()
        self.closed = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._unfinished or self.closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            self._unfinished.discard(item.request_id)
        return item

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def close(self) -> None:
        """Abort what has not finished and end the iteration; idempotent."""
        if self.closed:
            return
        self.closed = True
        self._engine.drop_stream(self)
        for request_id in self._unfinished:
            self._engine.abort(request_id)
        self._queue.put_nowait(None)  # wakes a reader waiting on the queue

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.error: BaseException | None = None
        self._adds: queue.SimpleQueue[Sequence] = queue.SimpleQueue()  # validated, not yet queued
        self._aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._streams: dict[str, RequestStream] = {}  # touched on the event loop only
        # KV demand of requests handed over but not yet queued, as two one-writer counters.
        self._blocks_handed = 0  # written on the event loop
        self._blocks_queued = 0  # written on the engine thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="kunserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self.engine.shutdown()

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    # ---- the event-loop side ----------------------------------------------------------------

    def kv_demand_blocks(self) -> int | None:
        """The engine's KV demand including requests still in hand-over; None when dead."""
        if not self.is_alive:
            return None
        return self.engine.kv_demand_blocks() + self._blocks_handed - self._blocks_queued

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not yet running (read across threads: approximate by a step)."""
        return self._adds.qsize() + len(self.engine.scheduler.waiting)

    def add_requests(
        self, request_ids: Seq[str], prompts: Seq[PromptInput], params: Seq[SamplingParams]
    ) -> RequestStream:
        """Validate all (ValueError names the field), then queue all; call from the event loop."""
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.error!r}")
        seqs = [self.engine.make_sequence(rid, p, sp) for rid, p, sp in zip(request_ids, prompts, params)]
        limit = self.max_waiting_requests
        if limit is not None and self.num_waiting + len(seqs) > limit:
            raise EngineOverloadedError(f"{self.num_waiting} requests are waiting; the limit is {limit}")
        stream = RequestStream(self, list(request_ids))
        for seq in seqs:
            self._streams[seq.request_id] = stream
            self._blocks_handed += self.engine.block_manager.blocks_for(len(seq))
            self._adds.put(seq)
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        self._aborts.put(request_id)
        self._wake.set()

    def drop_stream(self, stream: RequestStream) -> None:
        for request_id in stream.request_ids:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _fail_all(self, error: BaseException) -> None:
        for stream in set(self._streams.values()):
            stream.put(EngineDeadError(f"the engine stopped after an error: {error!r}"))

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        assert self._loop is not None
        try:
            while not self._stopping:
                if not self.engine.has_unfinished_requests():
                    self._wake.wait()
                self._wake.clear()
                self._take_inbox()
                outputs = self.engine.step()
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
        except BaseException as error:
            logger.exception("engine step failed; failing all its requests")
            self.error = error
            self._loop.call_soon_threadsafe(self._fail_all, error)
            self.engine.shutdown()

    def _take_inbox(self) -> None:
        # Adds before aborts: an abort may name a request added in the same batch.
        while not self._adds.empty():
            seq = self._adds.get()
            self.engine.add_sequence(seq)
            self._blocks_queued += self.engine.block_manager.blocks_for(len(seq))
        while not self._aborts.empty():
            self.engine.abort_request(self._aborts.get())
