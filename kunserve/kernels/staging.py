"""Host-to-device transfers of a step's inputs that never make the host wait for the device.

Host arrays are copied from pinned memory (a copy from pageable memory may wait for the
device), and a pinned buffer that is refilled every step is one of a ring, so that a step
staged while the previous one is still queued on the device (asynchronous scheduling) never
overwrites that step's inputs before they are read.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# Buffers of a ring: the step being staged and the one still queued before it.
STAGING_SLOTS = 2


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """`array` on `device`, through a pinned copy on CUDA (torch's caching host allocator
    keeps that block alive until the transfer has run)."""
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class PinnedRing:
    """Host buffers used in turn as the source of a copy to the device: `acquire` the next,
    fill it, enqueue its copy, then `copied`. A buffer is handed out again only once the
    copy that last read it has run."""

    def __init__(self, make: Callable[[], torch.Tensor], device: torch.device, slots: int = STAGING_SLOTS) -> None:
        cuda = device.type == "cuda"
        self.buffers = [make().pin_memory() if cuda else make() for _ in range(slots)]
        self._events = [torch.cuda.Event() if cuda else None for _ in range(slots)]
        self._next = 0

    def acquire(self) -> torch.Tensor:
        event = self._events[self._next]
        if event is not None:
            event.synchronize()  # long done in steady state: its step is two steps back
        return self.buffers[self._next]

    def copied(self) -> None:
        """The acquired buffer's copy is enqueued on the current stream."""
        event = self._events[self._next]
        if event is not None:
            event.record()
        self._next = (self._next + 1) % len(self.buffers)
