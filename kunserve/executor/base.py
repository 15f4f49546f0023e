"""How a step reaches the devices. The engine talks only to `Executor`; drops, restores and
migrations (kunserve/cluster/) talk to a replica's device through `WorkerExecutor`'s typed
calls (kunserve/worker/protocol.py's DeviceCalls).

Steps are submitted and their results collected in order. An executor whose devices form
a pipeline accepts up to `max_in_flight` steps (micro-batches) before the oldest must be
collected, so that every stage has work; a single device runs one at a time.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar

import numpy as np

from kunserve.layout import ArenaLayout
from kunserve.step import StepInput
from kunserve.worker.protocol import DeviceCalls, check_device_call

THIS_HOST = "this host"  # the host of executors that never leave the driver's machine

P = ParamSpec("P")
R = TypeVar("R")


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

    def exited(self) -> str | None:
        """Which of the devices' workers has exited, if any, seen without waiting (a health
        check from another thread than the one stepping); None where none is known to have."""
        return None


class Pending(Generic[R]):
    """A device call under way; `wait` returns its result. Calls posted to one device
    complete in the order they were posted."""

    def __init__(self, settle: Callable[[Pending[R]], None]) -> None:
        self._settle = settle
        self._done = False
        self._value: R | None = None

    def resolve(self, value: R) -> None:
        self._value, self._done = value, True

    def wait(self) -> R:
        if not self._done:
            self._settle(self)
        return self._value  # type: ignore[return-value]  # resolved by _settle


class WorkerExecutor(Executor):
    """An executor whose devices take DeviceCalls: what drops, restores and migrations drive,
    the same on worker processes, Ray actors and simulated devices. A call is posted to a
    stage's device at once and completes when waited for, so several devices can run the
    two ends of a transfer, or their halves of a drop, side by side."""

    def __init__(self) -> None:
        self._unsettled: defaultdict[int, deque[Pending[Any]]] = defaultdict(deque)

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

    def post(self, rank: int, call: Callable[Concatenate[DeviceCalls, P], R], *args: P.args,
             **kwargs: P.kwargs) -> Pending[R]:
        """Start `call` (a DeviceCalls method, e.g. DeviceCalls.pull_kv) on stage `rank`'s device."""
        self._start_call(rank, check_device_call(call.__name__), args, kwargs)
        pending: Pending[R] = Pending(functools.partial(self._settle, rank))
        self._unsettled[rank].append(pending)
        return pending

    def call(self, rank: int, call: Callable[Concatenate[DeviceCalls, P], R], *args: P.args,
             **kwargs: P.kwargs) -> R:
        """`post` and wait."""
        return self.post(rank, call, *args, **kwargs).wait()

    def _settle(self, rank: int, pending: Pending[Any]) -> None:
        """Read the device's replies in order until `pending` has its value."""
        queue = self._unsettled[rank]
        while True:
            first = queue.popleft()
            first.resolve(self._finish_call(rank))
            if first is pending:
                return

    @abstractmethod
    def _start_call(self, rank: int, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Send the call to the device."""

    @abstractmethod
    def _finish_call(self, rank: int) -> Any:
        """The result of the oldest call on the device not yet finished."""

    @abstractmethod
    def form_group(self, members: list[WorkerExecutor], blocks: StageBlockMap) -> Executor:
        """The executor of a pipeline group fused from these one-device replicas of this
        executor's kind (member r is stage r), its steps translated to each stage's sub-blocks
        by `blocks`."""


class StageBlockMap(Protocol):
    """A group's logical block ids, bound to one physical sub-block per stage (the engine's
    StagedBlockManager)."""

    def translate(self, stage: int, block_tables: np.ndarray, slot_mapping: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
        """A step's logical block tables and KV slots as stage `stage`'s physical ones."""
        ...

    def translate_stages(self, block_tables: np.ndarray, slot_mapping: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`translate` for every stage at once: [stage, ...] arrays."""
        ...

    def stage_blocks(self, stage: int, block_ids: np.ndarray) -> np.ndarray:
        """Logical block ids as stage `stage`'s physical sub-blocks."""
        ...


class FusedGroupExecutor(Executor):
    """The executor of a pipeline group fused by a drop: its member replicas' executors
    (member r is stage r), which take the group's steps and, at the restore, run alone again."""

    def __init__(self, members: list[WorkerExecutor], blocks: StageBlockMap) -> None:
        self.members = list(members)
        self.blocks = blocks
        self.max_in_flight = len(members)

    @property
    def layout(self) -> ArenaLayout:
        return self.members[0].layout

    @property
    def num_swap_blocks(self) -> int:
        """Host blocks for the group's swapped-out KV: a group's block is one sub-block of L/g
        layers on every stage, so each member's host pool holds g of them per replica block
        (0 where the members have none: the group preempts by recompute)."""
        return min(member.num_swap_blocks for member in self.members) * len(self.members)

    def stage_step(self, stage: int, step: StepInput) -> StepInput:
        """`step` as stage `stage` runs it: its block tables, KV slots and swapped device
        blocks as the stage's physical sub-blocks (a host block is the same sub-block id on
        every stage's host pool)."""
        tables, slots = self.blocks.translate(stage, step.batch.block_tables, step.batch.slot_mapping)
        return dataclasses.replace(
            step,
            batch=dataclasses.replace(step.batch, block_tables=tables, slot_mapping=slots),
            swap_out=self._stage_pairs(stage, step.swap_out, device_column=0),
            swap_in=self._stage_pairs(stage, step.swap_in, device_column=1),
        )

    def _stage_pairs(self, stage: int, pairs: np.ndarray, device_column: int) -> np.ndarray:
        if not len(pairs):
            return pairs
        staged = pairs.copy()
        staged[:, device_column] = self.blocks.stage_blocks(stage, pairs[:, device_column])
        return staged

    def kv_block_ids(self) -> range:
        raise RuntimeError("a group's blocks are bound at the drop, not listed up front")

    def release_layer(self, layer: int) -> range:
        raise RuntimeError("a group's layers are dropped and restored by kunserve/cluster/transitions.py")

    def reclaim_layer(self, layer: int) -> None:
        raise RuntimeError("a group's layers are dropped and restored by kunserve/cluster/transitions.py")

    def shutdown(self) -> None:
        """Stop the members' workers: only when the group failed (a restore hands the members'
        devices back to their replicas instead)."""
        for member in self.members:
            member.shutdown()

    def exited(self) -> str | None:
        return next((gone for member in self.members if (gone := member.exited()) is not None), None)
