"""How a step reaches the devices. The control plane talks only to this interface.

Steps are submitted and their results collected in order. An executor whose devices form
a pipeline accepts up to `max_in_flight` steps (micro-batches) before the oldest must be
collected, so that every stage has work; a single device runs one at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from kunserve.layout import ArenaLayout
from kunserve.step import StepInput


class Executor(ABC):
    max_in_flight: int = 1

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
