"""The engine on its own thread, for a server: the asyncio side adds requests and reads
their outputs as async streams, while the loop thread runs steps back to back, so HTTP
work never waits for a step and a step never waits for HTTP.

A loop whose devices fail goes down: the requests its devices held end with the error, those
that never started are handed to `on_failure` (a cluster runs them elsewhere and restarts the
replica), and `revive` puts the loop back in service on a new engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from collections.abc import Sequence as Seq

from typing_extensions import Self

from kunserve.engine.llm_engine import LLMEngine, PromptInput
from kunserve.engine.sequence import Sequence
from kunserve.outputs import RequestOutput
from kunserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

STOP_GRACE_S = 10.0  # how long stopping waits for the loop thread once its workers are stopped


class EngineOverloadedError(RuntimeError):
    """The waiting queue is at its limit: the client should retry later."""


class EngineDeadError(RuntimeError):
    """A step failed: the requests it ran end with this, and the engine takes no more until
    it is revived."""


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


# What a loop that went down reports: itself, the error, and the requests that never started
# (nothing of them was lost: they can run elsewhere).
FailureCallback = Callable[["AsyncEngine", BaseException, list[Sequence]], None]


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        max_waiting_requests: int | None = None,
        streams: dict[str, RequestStream] | None = None,
    ) -> None:
        """`streams`: a registry shared by a cluster's engines, so a request's outputs reach
        its stream whichever engine runs it after a drop or restore."""
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.error: BaseException | None = None  # the last failure
        self.on_failure: FailureCallback | None = None  # None: the unstarted requests fail too
        self._down = False  # failed, not yet revived
        self._down_lock = threading.Lock()  # several threads may see the same failure
        self._adds: queue.SimpleQueue[Sequence] = queue.SimpleQueue()  # validated, not yet queued
        # (request id, passed on from another loop): requests move between engines (drops,
        # restores, migrations), so an abort this engine does not know goes to the others once.
        self._aborts: queue.SimpleQueue[tuple[str, bool]] = queue.SimpleQueue()
        self.peers: list[AsyncEngine] = []  # a cluster's loops, this one included
        self._wake = threading.Event()
        self._stopping = False
        self._streams: dict[str, RequestStream] = {} if streams is None else streams  # event loop only
        # Held by the loop around each step; a drop or restore holds it to change the engine.
        self._step_lock = threading.Lock()
        # After a drop made another engine run this one's requests: where requests now go.
        self.forward_to: AsyncEngine | None = None
        # KV demand of requests handed over but not yet in the engine's queue.
        self._pending_blocks = 0
        self._pending_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="kunserve-engine", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Make the loop thread exit after its current step, without waiting for it."""
        self._stopping = True
        self._wake.set()

    def join(self) -> None:
        """Wait for the loop thread to exit, a bounded time: a step blocked on a worker ends
        when the worker is stopped (`shutdown`) or misses its deadline."""
        if self._thread is not None:
            self._thread.join(STOP_GRACE_S)
            if self._thread.is_alive():
                logger.warning("the engine loop thread did not exit within %.0f s; leaving it", STOP_GRACE_S)

    def stop(self) -> None:
        """Stop the loop thread (the engine's workers keep running)."""
        self.request_stop()
        self.join()

    def shutdown(self) -> None:
        """Stop the loop and the engine's workers; a step waiting on them ends as they stop."""
        self.request_stop()
        self.engine.shutdown()
        self.join()

    @property
    def is_alive(self) -> bool:
        """Serving, or ready to once started: not down, not stopped."""
        return not self._down and not self._stopping

    # ---- the event-loop side ----------------------------------------------------------------

    def kv_demand_blocks(self) -> int | None:
        """The engine's KV demand including requests still in hand-over; None when dead or
        merged into a group (not a replica to send requests to)."""
        if not self.is_alive or self.forward_to is not None:
            return None
        return self.engine.kv_demand_blocks() + self._pending_blocks

    def kv_load(self) -> float | None:
        """The KV demand as a fraction of the engine's blocks (a group has more than a
        replica); None when not a replica to send requests to."""
        demand = self.kv_demand_blocks()
        return None if demand is None else demand / self.engine.block_manager.num_total_blocks

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not yet running (read across threads: approximate by a step)."""
        return self._adds.qsize() + len(self.engine.scheduler.waiting)

    def add_requests(
        self, request_ids: Seq[str], prompts: Seq[PromptInput], params: Seq[SamplingParams]
    ) -> RequestStream:
        """Validate all (ValueError names the field), then queue all; call from the event loop."""
        if self.forward_to is not None:
            return self.forward_to.add_requests(request_ids, prompts, params)
        if not self.is_alive:
            raise EngineDeadError(f"the engine stopped after an error: {self.error!r}")
        seqs = [self.engine.make_sequence(rid, p, sp) for rid, p, sp in zip(request_ids, prompts, params)]
        limit = self.max_waiting_requests
        if limit is not None and self.num_waiting + len(seqs) > limit:
            raise EngineOverloadedError(f"{self.num_waiting} requests are waiting; the limit is {limit}")
        stream = RequestStream(self, list(request_ids))
        for seq in seqs:
            self._streams[seq.request_id] = stream
            self._hand(seq)
        self._wake.set()
        return stream

    def adopt_unstarted(self, seqs: list[Sequence]) -> None:
        """Run requests that never started on a loop that went down (their streams are in the
        shared registry); any thread."""
        for seq in seqs:
            self._hand(seq)
        self._wake.set()

    def _hand(self, seq: Sequence) -> None:
        with self._pending_lock:
            self._pending_blocks += self.engine.block_manager.blocks_for(len(seq))
        self._adds.put(seq)

    def _next_handed(self) -> Sequence:
        seq = self._adds.get()
        with self._pending_lock:
            self._pending_blocks -= self.engine.block_manager.blocks_for(len(seq))
        return seq

    def abort(self, request_id: str, passed_on: bool = False) -> None:
        if self.forward_to is not None:
            self.forward_to.abort(request_id, passed_on)
            return
        if self._down:  # its requests ended or moved on: only another loop may hold this one
            if not passed_on:
                self._pass_abort(request_id)
            return
        self._aborts.put((request_id, passed_on))
        self._wake.set()

    def _pass_abort(self, request_id: str) -> None:
        for peer in self.peers:
            if peer is not self:
                peer.abort(request_id, passed_on=True)

    # ---- changing what this loop runs (a drop or restore, from the coordinator) --------------

    def pause(self) -> None:
        """Wait until the loop is between steps and keep it there, with no step in flight (a
        step scheduled ahead is completed and its outputs delivered); queued adds and aborts
        are applied to the engine first, so the engine holds every request handed to this loop.
        Bounded: a step ends within the workers' deadline (EngineConfig.worker_timeout_s).
        A loop that is down stays as it is (a caller checks `is_alive`)."""
        self._step_lock.acquire()
        if self._down or self.forward_to is not None:
            return
        if self.engine.num_in_flight:
            try:
                self.deliver_from_thread(self.engine.drain())
            except Exception as error:  # its devices failed: as a failed step would
                logger.exception("completing the step in flight failed; failing all its requests")
                self.fail(error)
                return
        self._take_inbox()

    def resume(self) -> None:
        self._step_lock.release()
        self._wake.set()

    def run_engine(self, engine: LLMEngine) -> None:
        """While paused: step `engine` from now on (a group's after a drop, its own after a restore)."""
        self.engine = engine

    def merge_into(self, owner: AsyncEngine) -> None:
        """While paused: requests now go to `owner` (which runs this engine's requests)."""
        self.forward_to = owner
        self._forward_inbox()

    def _forward_inbox(self) -> None:
        """Pass requests and aborts that reached this loop after it was merged to the owner."""
        assert self.forward_to is not None
        while not self._adds.empty():
            self.forward_to._hand(self._next_handed())
        while not self._aborts.empty():
            self.forward_to.abort(*self._aborts.get())
        self.forward_to._wake.set()

    def unmerge(self) -> None:
        self.forward_to = None

    def revive(self, engine: LLMEngine) -> None:
        """Serve again, on `engine` (the replica's new devices after a restart): requests
        handed to this loop while it was down run now."""
        with self._step_lock:
            self.engine = engine
            self.forward_to = None
            self._down = False
        self._wake.set()

    def drop_stream(self, stream: RequestStream) -> None:
        for request_id in stream.request_ids:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]

    def deliver_from_thread(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs produced off the event loop (by a transition) to their streams."""
        if outputs and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _end(self, request_ids: list[str], error: EngineDeadError) -> None:
        for stream in {self._streams[rid] for rid in request_ids if rid in self._streams}:
            stream.put(error)

    def _end_from_thread(self, request_ids: list[str], error: EngineDeadError) -> None:
        if self._loop is not None and request_ids:
            with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody reads the streams
                self._loop.call_soon_threadsafe(self._end, request_ids, error)

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        assert self._loop is not None
        while not self._stopping:
            if self._down or not self.engine.has_unfinished_requests():
                self._wake.wait()
            self._wake.clear()
            with self._step_lock:
                if self._down or self._stopping:
                    continue
                if self.forward_to is not None:  # merged: the owner runs everything
                    self._forward_inbox()
                    continue
                try:
                    self._take_inbox()
                    outputs = self.engine.step()
                except Exception as error:
                    if not self._stopping:  # else: its workers were stopped under it
                        logger.exception("engine step failed; failing the requests it ran")
                        self.fail(error)
                    continue
                due = self.engine.next_step_due_at()
            if outputs:
                self._loop.call_soon_threadsafe(self._deliver, outputs)
            self._wait_until(due)
        if not self._down and self.forward_to is None:  # no client waits on a loop that is gone
            lost = self.engine.unfinished_request_ids()
            while not self._adds.empty():
                lost.append(self._next_handed().request_id)
            self._end_from_thread(lost, EngineDeadError("the engine was stopped (the server is shutting down)"))

    def _wait_until(self, due: float | None) -> None:
        """Until the step ahead is due (the engine's clock), between steps, so that it takes
        the requests arriving meanwhile; a transition may pause the loop meanwhile. An arrival
        (an abort, a stop) ends the wait at once: the step formed then takes it, and the device
        runs the step before for the rest of the wait, time to start a new request's prefill."""
        if due is not None:
            delay = due - self.engine.clock()
            if delay > 0:
                self._wake.wait(delay)

    def fail(self, error: BaseException) -> None:
        """Go down: the engine's workers are stopped; every request whose state was on them
        ends with an error naming `error` (a failed step, or a transition that left the devices
        in no usable state); requests that never started go to `on_failure` (or fail too);
        aborts go to the other loops. The caller holds the loop (its thread, or paused)."""
        with self._down_lock:
            if self._down:
                return
            self._down = True
        self.error = error
        self._wake.set()
        engine = self.engine
        unstarted = engine.take_unstarted()
        while not self._adds.empty():
            unstarted.append(self._next_handed())
        while not self._aborts.empty():
            request_id, passed_on = self._aborts.get()
            if not passed_on:
                self._pass_abort(request_id)
        lost = engine.unfinished_request_ids()
        on_failure = None if self._stopping else self.on_failure
        if on_failure is None:
            lost += [seq.request_id for seq in unstarted]
        self._end_from_thread(lost, EngineDeadError(f"the engine stopped after an error: {error!r}"))
        engine.shutdown()
        if on_failure is not None:
            on_failure(self, error, unstarted)

    def _take_inbox(self) -> None:
        # Adds before aborts: an abort may name a request added in the same batch.
        while not self._adds.empty():
            self.engine.add_sequence(self._next_handed())
        while not self._aborts.empty():
            request_id, passed_on = self._aborts.get()
            if self.engine.has_request(request_id):
                self.engine.abort_request(request_id)
            elif not passed_on:
                self._pass_abort(request_id)
