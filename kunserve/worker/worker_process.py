"""A worker process: one device, one pipeline stage (or one tensor-parallel rank of it).

Commands come from the driver over a pipe (the light control channel: pickled host
arrays). Activations go from stage to stage over the links between neighbours
(kunserve/worker/peers.py: gloo on CPU, NCCL on GPU), tensor-parallel rank r of one stage to
rank r of the next; a stage's ranks run their collectives in a group of their own
(kunserve/worker/parallel.py). Only the last stage answers a step (its tensor-parallel rank 0),
with its sampled tokens (and its compute time, for the bubble metric).
Every stage (every rank) gets every step command, so each knows the batch's shape without asking.
`start_worker` and `CommandHandler` (what one command does) are shared with the Ray actor
of kunserve/worker/ray_worker.py, whose commands arrive as actor calls instead.

A worker never outlives its driver: it exits when the pipe closes, and a watchdog thread ends
it when its parent is gone while it is busy (e.g. waiting on a peer): the forkserver it was
forked from (kunserve/executor/multiproc.py), which exits when the driver does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
import torch.multiprocessing

from kunserve.config import EngineConfig
from kunserve.logs import configure_worker
from kunserve.model.presets import ResolvedModel
from kunserve.step import StepInput
from kunserve.worker.parallel import tensor_parallel_group
from kunserve.worker.peers import PeerLinks
from kunserve.worker.protocol import Command, Reply, StageAssignment, check_device_call
from kunserve.worker.worker import Worker, build_worker

logger = logging.getLogger(__name__)

ORPHAN_CHECK_S = 0.5  # how often a worker looks whether its driver is still there
ORPHAN_EXIT_CODE = 3  # what a worker whose driver vanished exits with
OPEN_DESCRIPTORS = "/proc/self/fd"
STDERR_FD = 2  # stdin, stdout and stderr stay inherited


def start_worker(config: EngineConfig, model: ResolvedModel, stage: StageAssignment) -> Worker:
    """Set this process up for its stage (CPU threads, device, its tensor-parallel group, the
    links to its pipeline neighbours) and build the stage's worker: the same in a worker
    process and in a Ray actor."""
    # Shared CPU tensors travel as shared-memory file names: plain bytes the driver can
    # pass on between workers (see PeerLinks.export).
    torch.multiprocessing.set_sharing_strategy("file_system")
    device = torch.device(stage.device)
    if device.type == "cpu":
        start_shared_memory_manager()
    if config.worker_threads is not None:
        torch.set_num_threads(config.worker_threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    peers = PeerLinks(device, stage.world, stage.global_rank)
    tp = tensor_parallel_group(stage, peers, device)
    worker = build_worker(config, model, stage.layer_range, device, stage.pipe, tp, stage.pipe_back, peers)
    # In stage order (each links to its previous neighbour, then its next, then a first or last
    # stage to the other end, unless that is its neighbour), so no stage waits for one that
    # waits for it.
    for peer in (*stage.pipe, stage.pipe_back if stage.pipe_back not in stage.pipe else None):
        if peer is not None:
            worker.peers.connect(peer)
    return worker


def start_shared_memory_manager() -> None:
    """Start torch's shared-memory manager now, before this worker opens links. Torch starts it
    (torch_shm_manager, a child process) when the first tensor moves to shared memory, e.g. the
    arena at its first export, and the child keeps every descriptor open then that its exec
    does not close: links to peers would then outlive this worker, so a peer waiting on one
    would not see it die, and the manager itself would never see its last client go."""
    torch.zeros(1).share_memory_()


def keep_descriptors_from_children() -> None:
    """Mark every descriptor this process was started with (its pipe to the driver, the pipe
    whose closing tells the driver it died) as not inherited by programs it starts: a child
    holding them would hide this worker's death from the driver (Linux: /proc)."""
    if not os.path.isdir(OPEN_DESCRIPTORS):
        return
    for name in os.listdir(OPEN_DESCRIPTORS):
        fd = int(name)
        if fd > STDERR_FD:
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed already
                os.set_inheritable(fd, False)


def worker_main(config: EngineConfig, model: ResolvedModel, stage: StageAssignment, conn: Connection) -> None:
    """The process's main function (after kunserve/worker/process_entry.py, which ignores
    Ctrl-C first): build the stage, report its layout, then serve commands."""
    configure_worker(stage.log_name)
    keep_descriptors_from_children()
    watch_driver(os.getppid())
    begin = time.perf_counter()
    logger.info("starting on %s: layers [%d, %d) of %s", stage.device, *stage.layer_range, model.name)
    try:
        worker = start_worker(config, model, stage)
        conn.send((Reply.READY, worker.layout))
        logger.info("ready in %.1f s", time.perf_counter() - begin)
        _serve(CommandHandler(worker, stage), conn)
    except BaseException:
        conn.send((Reply.ERROR, traceback.format_exc()))
        raise


def watch_driver(parent_pid: int) -> None:
    """End this process as soon as its parent is gone (the driver, or the driver's forkserver,
    which exits with it; this process is then re-parented), whatever its main thread waits
    on: a worker must never be left behind."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            threading.Event().wait(ORPHAN_CHECK_S)
        os._exit(ORPHAN_EXIT_CODE)  # at once: the main thread may be blocked in native code

    threading.Thread(target=watch, name="kunserve-driver-watch", daemon=True).start()


def _serve(handler: CommandHandler, conn: Connection) -> None:
    while True:
        try:
            command, argument = conn.recv()
        except EOFError:
            logger.info("the driver is gone; exiting")
            return
        if command == Command.SHUTDOWN:
            handler.close()
            return
        reply = handler.handle(command, argument)
        if reply is not None:
            conn.send(reply)


def staged_step(stage: int, shared: bytes) -> StepInput:
    """A group's step as stage `stage` runs it: the step all stages share, its logical block
    tables and KV slots replaced by this stage's row of every stage's physical ones."""
    step: StepInput
    step, block_tables, slot_mapping = pickle.loads(shared)
    batch = step.batch
    batch.block_tables = stage_row(block_tables, stage, batch.block_tables)
    batch.slot_mapping = stage_row(slot_mapping, stage, batch.slot_mapping)
    return step


def stage_row(rows: bytes, stage: int, like: np.ndarray) -> np.ndarray:
    """Row `stage` of a [stage, *like.shape] array of `like`'s dtype, sent as its raw bytes
    (pickling a small array costs the driver more than copying it)."""
    return np.frombuffer(rows, like.dtype, like.size, stage * like.nbytes).reshape(like.shape).copy()


class CommandHandler:
    """What a stage's worker does with one driver command, whatever carries the commands (a
    pipe here, a Ray actor's method calls in kunserve/worker/ray_worker.py)."""

    def __init__(self, worker: Worker, stage: StageAssignment) -> None:
        self.worker = worker
        # A static pipeline's logical block ids (see StageAssignment); a drop group's driver
        # sends each stage its physical ids instead.
        self.block_offset = worker.layout.initial_kv_blocks().start if stage.logical_block_ids else 0

    def handle(self, command: str, argument: Any) -> tuple[str, Any] | None:
        """The reply to `command` (None: it has none, e.g. a step on a stage that does not sample)."""
        if command == Command.EXECUTE:
            return self._execute(argument)
        if command == Command.EXECUTE_STAGED:
            return self._execute(staged_step(*argument))
        if command == Command.CALL:
            name, args, kwargs = argument
            return Reply.RETURNED, getattr(self.worker, check_device_call(name))(*args, **kwargs)
        if command == Command.TAKE_BUSY_S:
            return Reply.BUSY_S, self.worker.take_busy_seconds()
        raise ValueError(f"unknown worker command {command!r}")

    def close(self) -> None:
        self.worker.close()

    def _execute(self, step: StepInput) -> tuple[str, Any] | None:
        offset = self.block_offset
        if offset:
            step.batch.block_tables += offset
            step.batch.slot_mapping += offset * self.worker.layout.block_size
            step.swap_out[:, 0] += offset
            step.swap_in[:, 1] += offset
        sampled = self.worker.run_stage(step)
        if sampled is None:
            return None
        return Reply.SAMPLED, (sampled, self.worker.take_busy_seconds())
