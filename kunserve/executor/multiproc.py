"""One model over worker processes: a single device, or a pipeline group of g devices with
stage r holding layers [r·L/g, (r+1)·L/g) and g micro-batches in flight; with tensor
parallelism, each stage t processes holding a shard each.

A worker that dies is noticed at once (see kunserve/executor/workers.py): the step fails
with WorkerDiedError naming it, and the remaining workers are stopped. WorkerSetExecutor
(worker_set.py) is what this shares with the Ray executor: the same commands, another channel.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import threading
import weakref

import torch

from kunserve.config import EngineConfig
from kunserve.executor.rendezvous import Rendezvous
from kunserve.executor.worker_set import WorkerSetExecutor, stage_assignments
from kunserve.executor.workers import StartCancelled, WorkerHandle, WorkerSet
from kunserve.model.presets import ResolvedModel
from kunserve.worker import process_entry
from kunserve.worker.protocol import WorkerWorld

logger = logging.getLogger(__name__)

# What every worker imports first, and what takes seconds to: imported once, by the process
# that workers fork from (below), not again by each worker.
WORKER_PRELOAD = ["torch", "triton"]


def worker_context() -> mp.context.ForkServerContext:
    """Where worker processes come from: forked from a server process that imported
    WORKER_PRELOAD and nothing else (multiprocessing's forkserver), so that a worker starts
    without the seconds of importing torch, and is never a fork of the driver, whose threads
    and CUDA state a fork would copy. The worker's own modules it imports itself, under the
    environment it is given (process_entry)."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context


class MultiprocExecutor(WorkerSetExecutor):
    """The stages (their tensor-parallel ranks) as worker processes of this host."""

    def __init__(self, config: EngineConfig, model: ResolvedModel, world: WorkerWorld | None = None,
                 stop: threading.Event | None = None) -> None:
        """`world`: this executor's place among a cluster's workers; None: its devices link only
        to each other. `stop`: once set, the start is called off (StartCancelled)."""
        super().__init__()
        if stop is not None and stop.is_set():
            raise StartCancelled("called off before its workers started")
        context = worker_context()
        if world is None and config.devices_per_replica > 1:
            # The devices meet at a store of their own, which lives as long as this executor.
            self._rendezvous = Rendezvous(config.worker_timeout_s)
            world = self._rendezvous.world(config.devices_per_replica)
        stages = stage_assignments(config, model, world)
        check_devices_exist([torch.device(stage.device) for stage in stages])
        handles = []
        for stage in stages:
            parent, child = context.Pipe()
            arguments = pickle.dumps((config, model, stage), protocol=pickle.HIGHEST_PROTOCOL)
            process = context.Process(target=process_entry.run, args=(arguments, dict(os.environ), child),
                                      name=f"kunserve-worker{stage.global_rank}", daemon=True)
            process.start()
            child.close()
            logger.info("%s: process %d started; it loads its layers next", stage.log_name, process.pid)
            handles.append(WorkerHandle(process, parent, stage.global_rank))
        self.workers = WorkerSet(handles, config.worker_timeout_s, config.tensor_parallel_size)
        # Stop the processes (and free their devices) once nothing holds this executor any
        # more, e.g. a deleted LLM's; an explicit shutdown() before makes this a no-op.
        weakref.finalize(self, self.workers.shutdown)
        self._await_ready(config, stop)
        logger.info("%d worker process(es) ready, pids %s", len(handles), self.worker_pids)

    @property
    def worker_pids(self) -> list[int | None]:
        return [handle.process.pid for handle in self.workers.handles]


def check_devices_exist(devices: list[torch.device]) -> None:
    """ValueError, before any worker starts, when a replica's GPUs (pipeline stages x
    tensor-parallel ranks, from `device` on) run past this host's."""
    gpus = [d.index or 0 for d in devices if d.type == "cuda"]
    if gpus and max(gpus) >= torch.cuda.device_count():
        raise ValueError(
            f"pipeline_parallel_size x tensor_parallel_size: this replica's devices run to cuda:{max(gpus)}, "
            f"but this host has {torch.cuda.device_count()} GPU(s)"
        )
