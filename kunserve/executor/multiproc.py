"""One model over worker processes: a single device, or a pipeline group of g devices with
stage r holding layers [r·L/g, (r+1)·L/g) and g micro-batches in flight.

A worker that dies is noticed at once (see kunserve/executor/workers.py): the step fails
with WorkerDiedError naming it, and the remaining workers are stopped. WorkerSetExecutor is
what this shares with the Ray executor (ray_executor.py): the same commands, another channel.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import pickle
import socket
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from kunserve.config import EngineConfig
from kunserve.executor.base import Executor, WorkerExecutor
from kunserve.executor.workers import WorkerHandle, WorkerSet
from kunserve.layout import ArenaLayout
from kunserve.model.presets import ResolvedModel
from kunserve.step import StepInput
from kunserve.worker import process_entry
from kunserve.worker.worker_process import StageAssignment, WorkerWorld

if TYPE_CHECKING:
    from kunserve.engine.staged_block_manager import StagedBlockManager

logger = logging.getLogger(__name__)

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


def stage_assignments(config: EngineConfig, model: ResolvedModel, world: WorkerWorld) -> list[StageAssignment]:
    """Each stage's layers and device, for `config.pipeline_parallel_size` stages in `world`."""
    num_stages = config.pipeline_parallel_size
    return [
        StageAssignment(rank, num_stages, layers, str(config.stage_device(rank)), world,
                        logical_block_ids=num_stages > 1)
        for rank, layers in enumerate(pipeline_stage_ranges(model.spec.num_layers, num_stages))
    ]


class WorkerSetExecutor(WorkerExecutor):
    """One model over workers that serve kunserve/worker/worker_process.py's commands through a
    WorkerSet (pipes to processes here, Ray actor calls in ray_executor.py)."""

    workers: WorkerSet

    def _await_ready(self, config: EngineConfig) -> None:
        """Take every worker's "ready" (its arena layout); on any failure stop them all."""
        num_stages = len(self.workers)
        self.max_in_flight = num_stages
        # One device: its worker reads the next step while the driver processes this one's
        # tokens, and takes a step ahead's input tokens from its own last sampled ones.
        self.runs_ahead = num_stages == 1
        try:
            layouts: list[ArenaLayout] = [self.workers.receive(rank, "ready") for rank in range(num_stages)]
        except BaseException:
            self.shutdown()
            raise
        self._layout = layouts[0]
        swaps = config.preemption_mode == "swap"
        self._num_swap_blocks = min(layout.swap_blocks(config.swap_space_bytes) for layout in layouts) if swaps else 0
        if num_stages == 1:
            self._kv_block_ids = layouts[0].initial_kv_blocks()
        else:
            self._kv_block_ids = range(min(layout.num_initial_kv_blocks for layout in layouts))

    @property
    def layout(self) -> ArenaLayout:
        return self._layout

    @property
    def global_ranks(self) -> list[int]:
        """Each stage's rank in the cluster's torch.distributed world."""
        return [handle.global_rank for handle in self.workers.handles]

    @property
    def num_stages(self) -> int:
        return len(self.workers)

    @classmethod
    def form_group(cls, members: list[WorkerExecutor], blocks: StagedBlockManager) -> Executor:
        from kunserve.executor.group import GroupExecutor  # it builds on this module

        alike = [m for m in members if isinstance(m, cls)]
        if len(alike) != len(members):
            raise TypeError(f"a group's members must all be replicas of one kind ({cls.__name__})")
        return GroupExecutor(alike, blocks)

    @property
    def num_swap_blocks(self) -> int:
        return self._num_swap_blocks

    def kv_block_ids(self) -> range:
        return self._kv_block_ids

    def submit(self, step: StepInput) -> None:
        message = pickle.dumps(("execute", step), protocol=pickle.HIGHEST_PROTOCOL)
        for rank in range(len(self.workers)):
            self.workers.send(rank, message)

    def collect(self) -> np.ndarray:
        return self.workers.receive_sampled()

    def release_layer(self, layer: int) -> range:
        return self._single_stage_call("release", layer, "released")

    def reclaim_layer(self, layer: int) -> None:
        self._single_stage_call("reclaim", layer, "reclaimed")

    def post(self, rank: int, name: str, *args: Any) -> None:
        self.workers.post(rank, "call", (name, args))

    def result(self, rank: int) -> Any:
        return self.workers.receive(rank, "returned")

    def take_busy_seconds(self) -> list[float]:
        return self.workers.take_busy_seconds()

    def request_shutdown(self) -> None:
        self.workers.request_shutdown()

    def shutdown(self) -> None:
        self.workers.shutdown()

    def _single_stage_call(self, command: str, argument: int, reply: str) -> Any:
        if len(self.workers) > 1:
            raise RuntimeError(f"{command}: a static pipeline group does not drop layers; replicas do")
        self.workers.post(0, command, argument)
        return self.workers.receive(0, reply)


class MultiprocExecutor(WorkerSetExecutor):
    """The stages as worker processes of this host."""

    def __init__(self, config: EngineConfig, model: ResolvedModel, world: WorkerWorld | None = None) -> None:
        """`world`: the cluster's shared world; None: a world of this executor's stages alone."""
        context = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        world = world or WorkerWorld(f"tcp://127.0.0.1:{free_port()}", config.pipeline_parallel_size)
        handles = []
        for stage in stage_assignments(config, model, world):
            parent, child = context.Pipe()
            arguments = pickle.dumps((config, model, stage), protocol=pickle.HIGHEST_PROTOCOL)
            process = context.Process(target=process_entry.run, args=(arguments, child),
                                      name=f"kunserve-worker{stage.global_rank}", daemon=True)
            process.start()
            child.close()
            logger.info("%s: process %d started; it loads its layers next", stage.log_name, process.pid)
            handles.append(WorkerHandle(process, parent, stage.global_rank))
        self.workers = WorkerSet(handles)
        # Stop the processes (and free their devices) once nothing holds this executor any
        # more, e.g. a deleted LLM's; an explicit shutdown() before makes this a no-op.
        weakref.finalize(self, self.workers.shutdown)
        self._await_ready(config)
        logger.info("%d worker process(es) ready, pids %s", len(handles), self.worker_pids)

    @property
    def worker_pids(self) -> list[int | None]:
        return [handle.process.pid for handle in self.workers.handles]
