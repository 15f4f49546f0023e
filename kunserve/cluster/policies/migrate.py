"""`migrate` (Llumnix): load-aware dispatch plus live migration. When a replica cannot admit
its queue for `drop_after_s`, its youngest running requests move to the replica with the most
spare blocks (each overloaded replica gets its own destination at a check, and the pairs
migrate side by side)."""

from __future__ import annotations

import functools

from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.policies.base import OverloadPolicy, OverloadTimer, deficit
from kunserve.cluster.runner import TransitionRunner
from kunserve.cluster.view import ClusterView


class MigratePolicy(OverloadPolicy):
    name = "migrate"

    def __init__(self, config: CoordinatorConfig, cluster: ClusterView, runner: TransitionRunner) -> None:
        super().__init__(config, cluster, runner)
        self.overloads = OverloadTimer(self.config.drop_after_s)

    def watches(self) -> bool:
        return len(self.cluster.engines) > 1

    def check(self, now: float) -> None:
        free = self.runner.replicas_in_replica_mode()
        due = self.overloads.update(now, {i: deficit(self.cluster.engines[i]) > 0 for i in free})
        self.cluster.run_together([functools.partial(self._relieve, src, dst)
                                   for src, dst in self._pairs(sorted(due), free)])

    def is_idle(self) -> bool:
        return not self.overloads.timing and all(
            engine.scheduler.num_waiting_blocks == 0 for engine in self.cluster.engines)

    def _spare(self, replica: int) -> int:
        """Blocks a migration may bring to `replica`: free, less its queue and headroom."""
        engine = self.cluster.engines[replica]
        headroom = int(self.config.migrate_headroom * engine.block_manager.num_total_blocks)
        return -deficit(engine) - headroom

    def _pairs(self, overloaded: list[int], free: list[int]) -> list[tuple[int, int]]:
        """Each overloaded replica, most short of blocks first, with the replica of most spare
        blocks not yet taken: disjoint pairs, whose migrations run side by side."""
        pairs: list[tuple[int, int]] = []
        taken = set(overloaded)
        for src in sorted(overloaded, key=lambda i: deficit(self.cluster.engines[i]), reverse=True):
            others = [i for i in free if i not in taken and self.cluster.replicas[i].is_alive]
            if not others:
                break
            dst = max(others, key=self._spare)
            taken.add(dst)
            pairs.append((src, dst))
        return pairs

    def _relieve(self, src: int, dst: int) -> None:
        """Migrate the youngest of `src`'s running requests to `dst`, while `src` is short of
        blocks for its queue and `dst` has room."""
        source, target = self.cluster.engines[src], self.cluster.engines[dst]
        for _ in range(self.config.max_migrations_per_check):
            if deficit(source) <= 0 or len(target.scheduler.running) >= target.config.max_num_seqs:
                return
            spare = self._spare(dst)
            # Read while the source steps (its requests are in flight then): the migration
            # checks again with the source paused.
            candidates = [seq for seq in reversed(list(source.scheduler.running)) if len(seq.block_ids) < spare]
            if not candidates or self.runner.migrate(candidates[0], src, dst, f"replica {src} overloaded") is None:
                return
