"""One model over workers that serve kunserve/worker/worker_process.py's commands through a
WorkerSet (pipes to processes in multiproc.py, Ray actor calls in ray_executor.py): a single
device or a static pipeline, and the group a drop fuses from such replicas.

A group's stages are its members' workers, still owned by the members' executors: each stage
gets the step with its own physical sub-block ids, and the last stage samples.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections import defaultdict, deque
from typing import Any

import numpy as np

from kunserve.config import EngineConfig
from kunserve.executor.base import Executor, FusedGroupExecutor, StageBlockMap, WorkerExecutor
from kunserve.executor.workers import WorkerSet
from kunserve.layout import ArenaLayout, stage_ranges
from kunserve.model.presets import ResolvedModel
from kunserve.step import StepInput
from kunserve.worker.protocol import Command, DeviceCalls, Reply, StageAssignment, WorkerWorld, loads_weights


def stage_assignments(config: EngineConfig, model: ResolvedModel, world: WorkerWorld | None) -> list[StageAssignment]:
    """Each stage's layers and device, for `config.pipeline_parallel_size` stages in `world`
    (None: one device that links to no other)."""
    num_stages = config.pipeline_parallel_size
    return [
        StageAssignment(rank, num_stages, layers, str(config.stage_device(rank)), world,
                        logical_block_ids=num_stages > 1)
        for rank, layers in enumerate(stage_ranges(model.spec.num_layers, num_stages))
    ]


def step_message(step: StepInput) -> bytes:
    """A step command, pickled once for every stage it goes to."""
    return pickle.dumps((Command.EXECUTE, step), protocol=pickle.HIGHEST_PROTOCOL)


class WorkerSetExecutor(WorkerExecutor):
    workers: WorkerSet

    def _await_ready(self, config: EngineConfig) -> None:
        """Take every worker's READY (its arena layout), each within the start deadline; on any
        failure stop them all."""
        num_stages = len(self.workers)
        self.max_in_flight = num_stages
        # One device: its worker reads the next step while the driver processes this one's
        # tokens, and takes a step ahead's input tokens from its own last sampled ones.
        self.runs_ahead = num_stages == 1
        self._start_timeout_s = config.worker_start_timeout_s
        # By stage: whether each call made and not yet answered reads weights from the checkpoint.
        self._calls_load: defaultdict[int, deque[bool]] = defaultdict(deque)
        try:
            layouts: list[ArenaLayout] = [self.workers.receive(rank, Reply.READY, config.worker_start_timeout_s)
                                          for rank in range(num_stages)]
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

    def form_group(self, members: list[WorkerExecutor], blocks: StageBlockMap) -> Executor:
        alike = [m for m in members if isinstance(m, type(self))]
        if len(alike) != len(members):
            raise TypeError(f"a group's members must all be replicas of one kind ({type(self).__name__})")
        return WorkerGroupExecutor(alike, blocks)

    @property
    def num_swap_blocks(self) -> int:
        return self._num_swap_blocks

    def kv_block_ids(self) -> range:
        return self._kv_block_ids

    def submit(self, step: StepInput) -> None:
        message = step_message(step)
        for rank in range(len(self.workers)):
            self.workers.send(rank, message)

    def collect(self) -> np.ndarray:
        return self.workers.receive_sampled()

    def release_layer(self, layer: int) -> range:
        self._refuse_static_pipeline("release_layer")
        return self.call(0, DeviceCalls.release_layer, layer)

    def reclaim_layer(self, layer: int) -> None:
        self._refuse_static_pipeline("reclaim_layer")
        self.call(0, DeviceCalls.reclaim_layer, layer)

    def _start_call(self, rank: int, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.workers.post(rank, Command.CALL, (name, args, kwargs))
        self._calls_load[rank].append(loads_weights(name, args, kwargs))

    def _finish_call(self, rank: int) -> Any:
        loads = self._calls_load[rank].popleft()
        return self.workers.receive(rank, Reply.RETURNED, self._start_timeout_s if loads else None)

    def take_busy_seconds(self) -> list[float]:
        return self.workers.take_busy_seconds()

    def request_shutdown(self) -> None:
        self.workers.request_shutdown()

    def shutdown(self) -> None:
        self.workers.shutdown()

    def exited(self) -> str | None:
        return self.workers.exited()

    def _refuse_static_pipeline(self, call: str) -> None:
        if len(self.workers) > 1:
            raise RuntimeError(f"{call}: a static pipeline group does not drop layers; replicas do")


class WorkerGroupExecutor(FusedGroupExecutor):
    """Replicas' workers driven as the stages of one pipeline, after a drop fused them."""

    def __init__(self, members: list[WorkerSetExecutor], blocks: StageBlockMap) -> None:
        super().__init__(list(members), blocks)
        # A set of the members' kind (pipes or Ray calls) over each member's one worker.
        self.workers = type(members[0].workers)([member.workers.handles[0] for member in members],
                                                members[0].workers.timeout_s)

    def submit(self, step: StepInput) -> None:
        self.refuse_swaps(step)
        for stage in range(len(self.members)):
            tables, slots = self.blocks.translate(stage, step.batch.block_tables, step.batch.slot_mapping)
            staged = dataclasses.replace(step, batch=dataclasses.replace(step.batch, block_tables=tables,
                                                                          slot_mapping=slots))
            self.workers.send(stage, step_message(staged))

    def collect(self) -> np.ndarray:
        return self.workers.receive_sampled()

    def take_busy_seconds(self) -> list[float]:
        return self.workers.take_busy_seconds()
