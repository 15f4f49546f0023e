"""How a step reaches the devices. The control plane talks only to this interface."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from kunserve.layout import ArenaLayout
from kunserve.step import StepInput


class Executor(ABC):
    @property
    @abstractmethod
    def layout(self) -> ArenaLayout:
        """The arena layout of the devices (equal on all of them)."""

    @abstractmethod
    def execute(self, step: StepInput) -> np.ndarray:
        """Run one step; returns the sampled token ids, one per sampled row."""

    @abstractmethod
    def release_layer(self, layer: int) -> range:
        """Drop local layer `layer`'s weights; returns the block ids its bytes provide."""

    @abstractmethod
    def reclaim_layer(self, layer: int) -> None:
        """Take local layer `layer`'s bytes back from the KV pool and refill its weights."""
