"""KV block accounting: which blocks are free, and each sequence's block table.

Control-plane only: block ids, never tensors. The pool can grow and shrink at run time,
when a layer's parameter bytes are released to KV and reclaimed (kunserve/layout.py).
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Iterable

import numpy as np

from kunserve.engine.sequence import Sequence


class BlockAccounting(ABC):
    """What the scheduler asks of a block pool: one device's (BlockManager) or a pipeline
    group's (StagedBlockManager)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    @property
    @abstractmethod
    def num_total_blocks(self) -> int: ...

    @property
    @abstractmethod
    def num_free_blocks(self) -> int: ...

    @property
    @abstractmethod
    def usage(self) -> float:
        """Fraction of the pool in use, as vLLM's kv_cache_usage_perc reports it."""

    @abstractmethod
    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s table to cover `num_tokens` tokens; False (and nothing taken) when too
        few blocks are free."""

    @abstractmethod
    def free(self, seq: Sequence) -> None: ...

    def settle(self) -> None:
        """The step scheduled last has gone to the devices: what it freed may be reused now."""

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still needs for its first `num_tokens` tokens to have KV slots."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_ids))


class BlockManager(BlockAccounting):
    def __init__(self, block_size: int, block_ids: Iterable[int]) -> None:
        super().__init__(block_size)
        self._pool: set[int] = set()  # every block the KV cache may use now
        self._free: set[int] = set()
        # Max-heap (negated ids) of free blocks: the highest ids go first, so the blocks of
        # released layers (the lowest ids) stay free longest and can be reclaimed sooner.
        self._heap: list[int] = []
        self.add_blocks(block_ids)

    @property
    def num_total_blocks(self) -> int:
        return len(self._pool)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks if self._pool else 0.0

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        missing = self.num_missing_blocks(seq, num_tokens)
        if missing > len(self._free):
            return False
        seq.block_ids.extend(self.take(missing))
        return True

    def free(self, seq: Sequence) -> None:
        self.give(seq.block_ids)
        seq.block_ids = []

    def take(self, count: int) -> list[int]:
        """`count` free blocks, now in use (the caller checked there are enough)."""
        taken: list[int] = []
        while len(taken) < count:
            block = -heapq.heappop(self._heap)
            if block in self._free:  # else a stale entry: claimed or removed since it was pushed
                self._free.remove(block)
                taken.append(block)
        return taken

    def claim(self, block_ids: Iterable[int]) -> None:
        """Mark these free blocks as in use (their KV is already there, e.g. after a drop);
        their heap entries go stale and `take` skips them."""
        ids = set(block_ids)
        if not ids <= self._free:
            raise ValueError(f"blocks {sorted(ids - self._free)[:8]} are not free")
        self._free -= ids

    def give(self, block_ids: Iterable[int]) -> None:
        """Return blocks in use to the free pool."""
        for block in block_ids:
            self._free.add(block)
            heapq.heappush(self._heap, -block)

    def free_ids(self) -> frozenset[int]:
        return frozenset(self._free)

    def is_free(self, block: int) -> bool:
        return block in self._free

    @property
    def pool(self) -> frozenset[int]:
        return frozenset(self._pool)

    def add_blocks(self, block_ids: Iterable[int]) -> None:
        new = set(block_ids)
        if new & self._pool:
            raise ValueError(f"blocks {sorted(new & self._pool)[:8]} are already in the KV pool")
        self._pool |= new
        self._free |= new
        # An ascending list is a valid heap: sort the negated ids once instead of pushing each.
        negated = np.sort(-np.fromiter(new, dtype=np.int64, count=len(new))).tolist()
        if self._heap:
            self._heap.extend(negated)
            heapq.heapify(self._heap)
        else:
            self._heap = negated

    def remove_blocks(self, block_ids: Iterable[int]) -> None:
        """Take blocks out of the pool; refused unless every one of them is free."""
        ids = set(block_ids)
        if not ids <= self._pool:
            raise ValueError(f"blocks {sorted(ids - self._pool)[:8]} are not in the KV pool")
        in_use = ids - self._free
        if in_use:
            raise RuntimeError(f"cannot remove {len(in_use)} blocks still in use, e.g. {sorted(in_use)[:8]}")
        self._pool -= ids
        self._free -= ids  # their heap entries go stale
