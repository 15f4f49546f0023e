"""One model over workers that serve kunserve/worker/worker_process.py's commands through a
WorkerSet (pipes to processes in multiproc.py, Ray actor calls in ray_executor.py): a single
device or a static pipeline, and the group a drop fuses from such replicas.

A group's stages are its members' workers, still owned by the members' executors: each stage
gets the step with its own physical sub-block ids, and the last stage samples.

With tensor parallelism each stage is `tensor_parallel_size` workers: every one gets every
step, and a device call goes to all of a stage's ranks as one (executor/tensor_parallel.py).
"""

from __future__ import annotations

import pickle
import threading
from collections import defaultdict, deque
from typing import Any

import numpy as np

from kunserve.config import EngineConfig
from kunserve.executor.base import Executor, FusedGroupExecutor, StageBlockMap, WorkerExecutor
from kunserve.executor.tensor_parallel import call_ranks, combine_replies, rank_arguments
from kunserve.executor.workers import WorkerSet
from kunserve.layout import ArenaLayout, stage_ranges
from kunserve.model.presets import ResolvedModel
from kunserve.step import StepInput
from kunserve.worker.protocol import Command, DeviceCalls, Reply, StageAssignment, WorkerWorld, takes_start_deadline


def stage_assignments(config: EngineConfig, model: ResolvedModel, world: WorkerWorld | None) -> list[StageAssignment]:
    """Each worker's stage, layers and device: `config.pipeline_parallel_size` stages of
    `config.tensor_parallel_size` ranks in `world`, stage by stage (None: one device that
    links to no other)."""
    num_stages, t = config.pipeline_parallel_size, config.tensor_parallel_size
    model.spec.check_tensor_parallel(t)
    return [
        StageAssignment(stage, num_stages, layers, str(config.stage_device(stage * t + tp_rank)), world,
                        logical_block_ids=num_stages > 1, tp_rank=tp_rank, tp_size=t)
        for stage, layers in enumerate(stage_ranges(model.spec.num_layers, num_stages))
        for tp_rank in range(t)
    ]


def step_message(step: StepInput) -> bytes:
    """A step command, pickled once for every stage it goes to."""
    return pickle.dumps((Command.EXECUTE, step), protocol=pickle.HIGHEST_PROTOCOL)


def staged_step_messages(step: StepInput, blocks: StageBlockMap, num_stages: int) -> list[bytes]:
    """A group's step command for each of its stages: pickled once, with every stage's blocks
    as raw bytes, for all stages (each takes its own row: kunserve/worker/worker_process.py's
    staged_step), so a group's host time per micro-batch stays near a replica's per step."""
    tables, slots = blocks.translate_stages(step.batch.block_tables, step.batch.slot_mapping)
    shared = pickle.dumps((step, tables.tobytes(), slots.tobytes()), protocol=pickle.HIGHEST_PROTOCOL)
    return [pickle.dumps((Command.EXECUTE_STAGED, (stage, shared)), protocol=pickle.HIGHEST_PROTOCOL)
            for stage in range(num_stages)]


class WorkerSetExecutor(WorkerExecutor):
    workers: WorkerSet

    def __init__(self) -> None:
        super().__init__()
        # Per stage, the calls posted and not yet answered: each one's name, and whether it has
        # the start's deadline (takes_start_deadline).
        self._calls_posted: defaultdict[int, deque[tuple[str, bool]]] = defaultdict(deque)

    def _await_ready(self, config: EngineConfig, stop: threading.Event | None) -> None:
        """Take every worker's READY (its arena layout), each within the start deadline; on any
        failure, or once `stop` is set (StartCancelled), stop them all."""
        num_stages = self.workers.num_stages
        self.max_in_flight = num_stages
        # Its workers read the next step while the driver processes this one's tokens, and
        # take a step ahead's input tokens from their own last sampled ones (a pipeline's first
        # stage, from the last stage's: Worker.run_stage).
        self.runs_ahead = True
        self._start_timeout_s = config.worker_start_timeout_s
        try:
            every: list[ArenaLayout] = [self.workers.receive(i, Reply.READY, config.worker_start_timeout_s, stop)
                                        for i in range(len(self.workers))]
        except BaseException:
            self.shutdown()
            raise
        # A stage's ranks hold equal shards: one layout, one set of block ids, for all of them.
        layouts = [every[self.workers.stage_workers(stage)[0]] for stage in range(num_stages)]
        if any(layout != layouts[i // self.workers.tp_size] for i, layout in enumerate(every)):
            self.shutdown()
            raise RuntimeError("the tensor-parallel ranks of a stage built different arena layouts")
        self._layout = layouts[0]
        self._num_swap_blocks = (min(layout.swap_blocks(config.swap_space_bytes) for layout in layouts)
                                 if config.can_swap else 0)
        if num_stages == 1:
            self._kv_block_ids = layouts[0].initial_kv_blocks()
        else:
            self._kv_block_ids = range(min(layout.num_initial_kv_blocks for layout in layouts))

    @property
    def layout(self) -> ArenaLayout:
        return self._layout

    @property
    def global_ranks(self) -> list[int]:
        """Each stage's global rank (its tensor-parallel rank 0's, by which device calls name
        it; kunserve/executor/rendezvous.py)."""
        return [self.workers.handles[self.workers.stage_workers(s)[0]].global_rank for s in range(self.num_stages)]

    @property
    def num_stages(self) -> int:
        return self.workers.num_stages

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
        """Send the call to each of stage `rank`'s workers that serves it."""
        workers, t = self.workers.stage_workers(rank), self.workers.tp_size
        for tp_rank in call_ranks(name, t):
            self.workers.post(workers[tp_rank], Command.CALL, (name, *rank_arguments(name, args, kwargs, tp_rank, t)))
        self._calls_posted[rank].append((name, takes_start_deadline(name, args, kwargs)))

    def _finish_call(self, rank: int) -> Any:
        name, start_work = self._calls_posted[rank].popleft()
        workers, timeout_s = self.workers.stage_workers(rank), self._start_timeout_s if start_work else None
        return combine_replies(name, [self.workers.receive(workers[tp_rank], Reply.RETURNED, timeout_s)
                                      for tp_rank in call_ranks(name, self.workers.tp_size)])

    def take_busy_seconds(self) -> list[float]:
        return self.workers.take_busy_seconds()

    def request_shutdown(self) -> None:
        self.workers.request_shutdown()

    def shutdown(self) -> None:
        self.workers.shutdown()

    def exited(self) -> str | None:
        return self.workers.exited()

    def _refuse_static_pipeline(self, call: str) -> None:
        if self.num_stages > 1:
            raise RuntimeError(f"{call}: a static pipeline group does not drop layers; replicas do")


class WorkerGroupExecutor(FusedGroupExecutor):
    """Replicas' workers driven as the stages of one pipeline, after a drop fused them."""

    def __init__(self, members: list[WorkerSetExecutor], blocks: StageBlockMap) -> None:
        super().__init__(list(members), blocks)
        # A set of the members' kind (pipes or Ray calls) over each member's one stage (its
        # tensor-parallel ranks: member r's rank k is stage r's rank k).
        sizes = [member.workers.tp_size for member in members]
        if len(set(sizes)) > 1:
            raise ValueError(f"tensor_parallel_size: a group's members must have one size, got {sizes}")
        self.workers = type(members[0].workers)([h for member in members for h in member.workers.handles],
                                                members[0].workers.timeout_s, sizes[0])
        self.runs_ahead = True  # the stages feed sampled tokens back (Worker.run_stage)

    def submit(self, step: StepInput) -> None:
        if len(step.swap_out) or len(step.swap_in):
            # A step that swaps (rare: memory ran out) goes whole to each stage, in its ids.
            messages = [step_message(self.stage_step(stage, step)) for stage in range(len(self.members))]
        else:
            messages = staged_step_messages(step, self.blocks, len(self.members))
        for stage, message in enumerate(messages):
            for worker in self.workers.stage_workers(stage):
                self.workers.send(worker, message)

    def collect(self) -> np.ndarray:
        return self.workers.receive_sampled()

    def take_busy_seconds(self) -> list[float]:
        return self.workers.take_busy_seconds()
