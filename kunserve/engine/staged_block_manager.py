"""KV accounting of a pipeline group formed by a drop: the scheduler sees logical block ids,
as in one engine, and each logical block binds one physical sub-block on every stage's
device (that stage's layers' KV for those tokens). Physical ids differ per stage because a
request that was running on replica h keeps its stage-h KV in place and gets fresh
sub-blocks on the other stages (filled by the KV exchange)."""

from __future__ import annotations

import numpy as np

from kunserve.engine.block_manager import BlockAccounting, BlockManager
from kunserve.engine.sequence import Sequence


class StagedBlockManager(BlockAccounting):
    def __init__(self, block_size: int, stages: list[BlockManager]) -> None:
        super().__init__(block_size)
        self.stages = stages  # per stage: its device's physical sub-blocks
        # [stage, logical id], its columns past the ids made so far spare room for more: grown by
        # doubling, so a decode's new block does not copy the whole table.
        self.physical = np.zeros((len(stages), 0), dtype=np.int64)
        self._num_ids = 0  # logical ids made so far (bound, or free to bind again)
        self._unbound: list[int] = []  # logical ids free to bind again
        # Logical ids freed since the last step was scheduled: a swap-out in that step names
        # them, and the devices translate them when it is submitted, so they are not rebound
        # to other sub-blocks before then (settle).
        self._freed: list[int] = []

    # ---- what the scheduler and engine use (as BlockManager) ----------------------------------

    @property
    def num_total_blocks(self) -> int:
        return min(stage.num_total_blocks for stage in self.stages)

    @property
    def num_free_blocks(self) -> int:
        return min(stage.num_free_blocks for stage in self.stages)

    @property
    def usage(self) -> float:
        return max(stage.usage for stage in self.stages)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        missing = self.num_missing_blocks(seq, num_tokens)
        if missing == 0:  # most decodes: nothing to bind (the per-step host cost of a group)
            return True
        if missing > self.num_free_blocks:
            return False
        seq.block_ids.extend(self.bind([stage.take(missing) for stage in self.stages]))
        return True

    def free(self, seq: Sequence) -> None:
        ids = np.asarray(seq.block_ids, dtype=np.int64)
        for stage, pool in enumerate(self.stages):
            pool.give(self.physical[stage, ids].tolist())
        self._freed.extend(seq.block_ids)
        seq.block_ids = []

    def settle(self) -> None:
        self._unbound.extend(self._freed)
        self._freed = []

    # ---- binding ------------------------------------------------------------------------------

    def bind(self, physical: list[list[int]]) -> list[int]:
        """New logical ids for blocks whose physical sub-blocks (one list per stage, equally
        long, already taken from the stages' pools) are given."""
        count = len(physical[0])
        ids = [self._unbound.pop() for _ in range(min(count, len(self._unbound)))]
        start = self._num_ids
        self._num_ids += count - len(ids)
        ids.extend(range(start, self._num_ids))
        if self._num_ids > self.physical.shape[1]:
            self._grow(self._num_ids)
        if count == 1:  # a decode's next block: element by element costs a third of an array's setitem
            for stage, row in enumerate(physical):
                self.physical[stage, ids[0]] = row[0]
        else:
            self.physical[:, ids] = np.asarray(physical, dtype=np.int64)
        return ids

    def _grow(self, num_ids: int) -> None:
        """Room for at least `num_ids` logical ids: twice what there was, or `num_ids`."""
        spare = max(num_ids, 2 * self.physical.shape[1]) - self.physical.shape[1]
        self.physical = np.concatenate([self.physical, np.zeros((len(self.stages), spare), np.int64)], axis=1)

    def translate(self, stage: int, block_tables: np.ndarray, slot_mapping: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A step's logical block tables and KV slots as stage `stage`'s physical ones."""
        return self._through(self.physical[stage], block_tables, slot_mapping)

    def translate_stages(self, block_tables: np.ndarray, slot_mapping: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`translate` for every stage at once: [stage, ...] arrays."""
        return self._through(self.physical, block_tables, slot_mapping)

    def _through(self, table: np.ndarray, block_tables: np.ndarray, slot_mapping: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Block tables and KV slots through `table` (logical id -> physical, on its last axis).
        np.take, not table[:, ids]: a [stage, ...] result's stage rows come out contiguous, as
        the kernels want."""
        bs = self.block_size
        physical_tables = np.take(table, block_tables, axis=-1)
        return physical_tables, np.take(table, slot_mapping // bs, axis=-1) * bs + slot_mapping % bs

    def stage_blocks(self, stage: int, block_ids: np.ndarray) -> np.ndarray:
        """Logical block ids as stage `stage`'s physical sub-blocks."""
        return self.physical[stage][block_ids]
