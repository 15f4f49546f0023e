"""How a step reaches the devices. The control plane talks only to this interface.

Steps are submitted and their results collected in order. An executor whose devices form
a pipeline accepts up to `max_in_flight` steps (micro-batches) before the oldest must be
collected, so that every stage has work; a single device runs one at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np

from kunserve.layout import ArenaLayout
from kunserve.step import StepInput

if TYPE_CHECKING:
    from kunserve.engine.staged_block_manager import StagedBlockManager


THIS_HOST = "this host"  # the host of executors that never leave the driver's machine


class Executor(ABC):
    max_in_flight: int = 1
    # Accepts one step beyond max_in_flight whose decodes take their input tokens from the
    # step before it on the device (asynchronous scheduling, kunserve/engine/scheduler.py).
    runs_ahead: bool = False

    @property
    @abstractmethod
    def layout(self) -> ArenaLayout:
        """The arena layout of the (first) device."""

    @property
    def num_swap_blocks(self) -> int:
        """Host blocks every device holds for swapped-out KV (0: preemption recomputes)."""
        return 0

    @abstractmethod
    def kv_block_ids(self) -> range:
        """The KV block ids the engine's block manager starts with."""

    @abstractmethod
    def submit(self, step: StepInput) -> None:
        """Start one step (its KV blocks stay reserved until it is collected)."""

    @abstractmethod
    def collect(self) -> np.ndarray:
        """The sampled token ids of the oldest submitted step, one per sampled row."""

    def execute(self, step: StepInput) -> np.ndarray:
        self.submit(step)
        return self.collect()

    def take_busy_seconds(self) -> list[float]:
        """Seconds each pipeline stage computed since the last take (the bubble metric);
        empty where the devices form no pipeline."""
        return []

    @abstractmethod
    def release_layer(self, layer: int) -> range:
        """Drop local layer `layer`'s weights; returns the block ids its bytes provide."""

    @abstractmethod
    def reclaim_layer(self, layer: int) -> None:
        """Take local layer `layer`'s bytes back from the KV pool and refill its weights."""

    def request_shutdown(self) -> None:
        """Ask the workers to stop without waiting, so that many executors stop together."""

    def shutdown(self) -> None:
        """Stop the devices' workers (nothing to do in-process)."""


class WorkerExecutor(Executor):
    """An executor whose devices take named calls (kunserve/worker/worker_process.py's
    WORKER_CALLS): what drops, restores and migrations (kunserve/cluster/) drive, the same on
    worker processes and on simulated devices."""

    @property
    @abstractmethod
    def global_ranks(self) -> list[int]:
        """Each stage's rank among all of a cluster's devices."""

    @property
    @abstractmethod
    def num_stages(self) -> int: ...

    @property
    def hosts(self) -> list[str]:
        """Each stage's host (a Ray node id): devices of one host copy from each other's memory,
        devices of two send over the network. All are on this host unless the executor spans
        machines."""
        return [THIS_HOST] * self.num_stages

    @abstractmethod
    def post(self, rank: int, name: str, *args: Any) -> None:
        """Start a named call on stage `rank`'s device; `result` collects it. Posting first
        and collecting later lets two devices run the two ends of a transfer."""

    @abstractmethod
    def result(self, rank: int) -> Any: ...

    def call(self, rank: int, name: str, *args: Any) -> Any:
        self.post(rank, name, *args)
        return self.result(rank)

    @classmethod
    @abstractmethod
    def form_group(cls, members: list[WorkerExecutor], blocks: StagedBlockManager) -> Executor:
        """The executor of a pipeline group fused from these one-device replicas (member r
        is stage r), its steps translated to each stage's sub-blocks by `blocks`."""


class FusedGroupExecutor(Executor):
    """The executor of a pipeline group fused by a drop: its member replicas' executors
    (member r is stage r), which take the group's steps and, at the restore, run alone again."""

    def __init__(self, members: list[WorkerExecutor], blocks: StagedBlockManager) -> None:
        self.members = list(members)
        self.blocks = blocks
        self.max_in_flight = len(members)

    @property
    def layout(self) -> ArenaLayout:
        return self.members[0].layout

    @staticmethod
    def refuse_swaps(step: StepInput) -> None:
        if len(step.swap_out) or len(step.swap_in):
            raise RuntimeError("a group formed by a drop preempts by recompute; it cannot swap")

    def kv_block_ids(self) -> range:
        raise RuntimeError("a group's blocks are bound at the drop, not listed up front")

    def release_layer(self, layer: int) -> range:
        raise RuntimeError("a group's layers are dropped and restored by kunserve/cluster/transitions.py")

    def reclaim_layer(self, layer: int) -> None:
        raise RuntimeError("a group's layers are dropped and restored by kunserve/cluster/transitions.py")
