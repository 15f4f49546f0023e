"""A worker process: one device, one pipeline stage.

Commands come from the driver over a pipe (the light control channel: pickled host
arrays). Activations go from stage to stage through torch.distributed point-to-point
(gloo on CPU, NCCL on GPU); only the last stage answers a step, with its sampled tokens
(and its compute time, for the bubble metric).
Every stage gets every step command, so each knows the batch's shape without asking.
`start_worker` and `CommandHandler` (what one command does) are shared with the Ray actor
of kunserve/worker/ray_worker.py, whose commands arrive as actor calls instead.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing

from kunserve.config import EngineConfig
from kunserve.logs import configure_worker
from kunserve.model.presets import ResolvedModel
from kunserve.step import StepInput
from kunserve.worker import drop
from kunserve.worker.worker import Worker, build_worker

logger = logging.getLogger(__name__)

# What the driver may call on a worker by name (("call", (name, args)) -> ("returned", result)).
WORKER_CALLS = {
    "become_stage": drop.become_stage,
    "become_replica": drop.become_replica,
    "export_arena": drop.export_arena,
    "open_peer": drop.open_peer,
    "warm_link": drop.warm_link,
    "pull_kv": drop.pull_kv,
    "send_kv": drop.send_kv,
    "recv_kv": drop.recv_kv,
    "move_kv": drop.move_kv,
    "take_sampler_states": drop.take_sampler_states,
    "give_sampler_states": drop.give_sampler_states,
    "kv_digests": drop.kv_digests,
    "weight_digests": drop.weight_digests,
}


@dataclass(frozen=True)
class WorkerWorld:
    """The torch.distributed world the workers of a whole cluster share, so any two can
    exchange tensors (activations within a group; KV and weights between replicas)."""

    init_method: str  # where the workers meet, e.g. tcp://127.0.0.1:port
    size: int
    first_rank: int = 0  # the global rank of this executor's stage 0
    # The rendezvous store runs in the driver, not in global rank 0: across hosts the
    # driver's address is the one known before the workers are placed (Ray).
    store_in_driver: bool = False


@dataclass(frozen=True)
class StageAssignment:
    rank: int  # the stage, within its group
    num_stages: int
    layer_range: tuple[int, int]
    device: str
    world: WorkerWorld
    # Stages of a pipeline hold different layer counts, so their arenas place KV blocks at
    # different ids: the driver then speaks logical ids 0..B-1 and each stage adds its own
    # first KV block id. A single stage uses its physical ids (release/reclaim address them).
    logical_block_ids: bool

    @property
    def global_rank(self) -> int:
        return self.world.first_rank + self.rank

    @property
    def log_name(self) -> str:
        """How this worker's log lines are prefixed. A cluster's world gives replica i the
        ranks [i * stages, (i + 1) * stages), so the replica follows from the first rank."""
        replica = self.world.first_rank // self.num_stages
        return f"worker[replica {replica} stage {self.rank} rank {self.global_rank}]"


class BusyClock:
    """The time this stage spends computing, not waiting for its input: with the wall time
    it gives the pipeline's bubble. On a GPU, CUDA events time each step and `take` reads
    only those already done (no host sync); on CPU the host clock does."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self._done_s = 0.0
        self._host_start = 0.0

    def begin(self) -> None:
        if self.cuda:
            self._pending.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self._pending[-1][0].record()
        else:
            self._host_start = time.perf_counter()

    def end(self) -> None:
        if self.cuda:
            self._pending[-1][1].record()
        else:
            self._done_s += time.perf_counter() - self._host_start

    def take(self) -> float:
        """Seconds computed since the last take (steps still running count at a later take)."""
        while self._pending and self._pending[0][1].query():
            start, end = self._pending.popleft()
            self._done_s += start.elapsed_time(end) / 1e3
        taken, self._done_s = self._done_s, 0.0
        return taken


def start_worker(config: EngineConfig, model: ResolvedModel, stage: StageAssignment) -> Worker:
    """Set this process up for its stage (CPU threads, device, the cluster's torch.distributed
    world) and build the stage's worker: the same in a worker process and in a Ray actor."""
    # Shared CPU tensors travel as shared-memory file names: plain bytes the driver can
    # pass on between workers (see drop.export_arena).
    torch.multiprocessing.set_sharing_strategy("file_system")
    if config.worker_threads is not None:
        torch.set_num_threads(config.worker_threads)
    device = torch.device(stage.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if stage.world.size > 1:
        join_world(stage.world, stage.global_rank, "nccl" if device.type == "cuda" else "gloo")
    return build_worker(config, model, stage.layer_range, device)


def join_world(world: WorkerWorld, rank: int, backend: str) -> None:
    """Join the cluster's torch.distributed world as global rank `rank`."""
    if not world.store_in_driver:
        dist.init_process_group(backend, init_method=world.init_method, rank=rank, world_size=world.size)
        return
    address = urlparse(world.init_method)
    store = dist.TCPStore(address.hostname, address.port, world.size, is_master=False)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world.size)


def worker_main(config: EngineConfig, model: ResolvedModel, stage: StageAssignment, conn: Connection) -> None:
    """The process's main function (after kunserve/worker/process_entry.py, which ignores
    Ctrl-C first): build the stage, report its layout, then serve commands."""
    configure_worker(stage.log_name)
    begin = time.perf_counter()
    logger.info("starting on %s: layers [%d, %d) of %s", stage.device, *stage.layer_range, model.name)
    try:
        worker = start_worker(config, model, stage)
        conn.send(("ready", worker.layout))
        logger.info("ready in %.1f s", time.perf_counter() - begin)
        _serve(CommandHandler(worker, stage), conn)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    # No destroy_process_group: it waits for the other workers of the world, which may be
    # shutting down one replica at a time; the process exit frees the group.


def _serve(handler: CommandHandler, conn: Connection) -> None:
    while True:
        try:
            command, argument = conn.recv()
        except EOFError:
            logger.info("the driver is gone; exiting")
            return
        if command == "shutdown":
            handler.close()
            return
        reply = handler.handle(command, argument)
        if reply is not None:
            conn.send(reply)


class CommandHandler:
    """What a stage's worker does with one driver command, whatever carries the commands (a
    pipe here, a Ray actor's method calls in kunserve/worker/ray_worker.py)."""

    def __init__(self, worker: Worker, stage: StageAssignment) -> None:
        self.worker = worker
        # A static pipeline's logical block ids (see StageAssignment); a drop group's driver
        # sends each stage its physical ids instead.
        self.block_offset = worker.layout.initial_kv_blocks().start if stage.logical_block_ids else 0
        worker.pipe_prev = stage.global_rank - 1 if stage.rank > 0 else None
        worker.pipe_next = stage.global_rank + 1 if stage.rank < stage.num_stages - 1 else None
        self.clock = BusyClock(worker.device)

    def handle(self, command: str, argument: Any) -> tuple[str, Any] | None:
        """The reply to `command` (None: it has none, e.g. a step on a stage that does not sample)."""
        worker = self.worker
        if command == "execute":
            return self._execute(argument)
        if command == "release":
            return "released", worker.release_layer(argument)
        if command == "reclaim":
            worker.reclaim_layer(argument)
            return "reclaimed", None
        if command == "call":
            name, call_args = argument
            return "returned", WORKER_CALLS[name](worker, *call_args)
        if command == "take_busy_s":
            return "busy_s", self.clock.take()
        raise ValueError(f"unknown worker command {command!r}")

    def close(self) -> None:
        self.worker.peer_arenas.clear()  # unmap peers' memory before the process exits

    def _execute(self, step: StepInput) -> tuple[str, Any] | None:
        worker, offset = self.worker, self.block_offset
        if offset:
            step.batch.block_tables += offset
            step.batch.slot_mapping += offset * worker.layout.block_size
            step.swap_out[:, 0] += offset
            step.swap_in[:, 1] += offset
        worker.swap(step)
        if step.num_tokens == 0:  # swaps only: nothing flows down the pipeline
            return ("sampled", (worker.runner.execute(step), 0.0)) if worker.pipe_next is None else None
        hidden_in = None
        if worker.pipe_prev is not None:
            dtype = worker.arena.buffer.dtype
            hidden_in = torch.empty((step.num_tokens, worker.spec.hidden_size), dtype=dtype, device=worker.device)
            dist.recv(hidden_in, src=worker.pipe_prev)
        self.clock.begin()
        hidden = worker.runner.forward(step, hidden_in)
        if worker.pipe_next is None:
            sampled = worker.runner.sample(step, hidden)
            self.clock.end()
            return "sampled", (sampled, self.clock.take())
        self.clock.end()
        dist.send(hidden.contiguous(), dst=worker.pipe_next)
        return None
