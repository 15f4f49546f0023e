"""A worker process: one device, one pipeline stage (or one tensor-parallel rank of it).

Commands come from the driver over a pipe (the light control channel: pickled host
arrays). Activations go from stage to stage through torch.distributed point-to-point
(gloo on CPU, NCCL on GPU); only the last stage answers a step (its tensor-parallel rank 0),
with its sampled tokens (and its compute time, for the bubble metric).
Every stage (every rank) gets every step command, so each knows the batch's shape without asking.
`start_worker` and `CommandHandler` (what one command does) are shared with the Ray actor
of kunserve/worker/ray_worker.py, whose commands arrive as actor calls instead.
"""

from __future__ import annotations

import logging
import pickle
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing

from kunserve.config import EngineConfig
from kunserve.logs import configure_worker
from kunserve.model.presets import ResolvedModel
from kunserve.step import StepInput
from kunserve.worker.parallel import tensor_parallel_group
from kunserve.worker.protocol import Command, Reply, StageAssignment, WorkerWorld, check_device_call
from kunserve.worker.worker import Worker, build_worker

logger = logging.getLogger(__name__)


def start_worker(config: EngineConfig, model: ResolvedModel, stage: StageAssignment) -> Worker:
    """Set this process up for its stage (CPU threads, device, the cluster's torch.distributed
    world, its tensor-parallel group) and build the stage's worker: the same in a worker
    process and in a Ray actor."""
    # Shared CPU tensors travel as shared-memory file names: plain bytes the driver can
    # pass on between workers (see PeerLinks.export).
    torch.multiprocessing.set_sharing_strategy("file_system")
    if config.worker_threads is not None:
        torch.set_num_threads(config.worker_threads)
    device = torch.device(stage.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if stage.world.size > 1:
        join_world(stage.world, stage.global_rank, "nccl" if device.type == "cuda" else "gloo")
    return build_worker(config, model, stage.layer_range, device, stage.pipe, tensor_parallel_group(stage, device),
                        stage.pipe_back)


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
        conn.send((Reply.READY, worker.layout))
        logger.info("ready in %.1f s", time.perf_counter() - begin)
        _serve(CommandHandler(worker, stage), conn)
    except BaseException:
        conn.send((Reply.ERROR, traceback.format_exc()))
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
        if command == Command.SHUTDOWN:
            handler.close()
            return
        reply = handler.handle(command, argument)
        if reply is not None:
            conn.send(reply)


def staged_step(shared: bytes, block_tables: np.ndarray, slot_mapping: np.ndarray) -> StepInput:
    """A group's step as one stage runs it: the step all stages share, with this stage's blocks."""
    step: StepInput = pickle.loads(shared)
    step.batch.block_tables, step.batch.slot_mapping = block_tables, slot_mapping
    return step


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
