"""The coordinator's settings: which overload policy, and the thresholds it acts on."""

from __future__ import annotations

from dataclasses import dataclass

from kunserve.cluster.planner import PlannerConfig


@dataclass
class CoordinatorConfig:
    overload_policy: str = "kunserve"  # a name in kunserve/cluster/policies/registry.py
    max_group_size: int | None = None  # largest group a drop forms; None: as large as the deficit needs
    drop_headroom: float = 0.1  # a drop's group keeps this fraction of its KV blocks free
    check_interval_s: float = 0.05
    # kunserve: requests waiting for memory (KV blocks, sequence slots) this long: drop, or a
    # group grows; migrate: queued demand above the free blocks this long: migrate.
    drop_after_s: float = 0.2
    restore_after_s: float = 2.0  # forecast demand within restore_fill of replica capacity this long: restore
    restore_fill: float = 0.5
    # A drop within this long of its replicas' restore is a drop-restore-drop cycle: each in a
    # row doubles the time the next restore waits for (kunserve/cluster/policies/kunserve.py).
    cycle_window_s: float = 30.0
    # A group's decode cycle over the cost model's prediction, as measured (2026-11-22, two
    # H200, eager stages: docs/results/drop_restore_h200x2.json through
    # benchmarks/group_step_factor.py): a drop must gain decode throughput net of it.
    group_step_factor: float = 1.22
    # A drop may cost at most this share of the members' decode throughput (net of the queue
    # it admits): the paper accepts 16-23% more TPOT for its lower tails; a compute-bound
    # cluster, whose throughput a pipeline would cut further, keeps its replicas.
    min_drop_gain: float = 0.8
    migrate_headroom: float = 0.1  # a migration's destination keeps this fraction of its KV blocks free
    max_migrations_per_check: int = 8

    def __post_init__(self) -> None:
        if not 0 <= self.migrate_headroom < 1:
            raise ValueError(f"migrate_headroom: must be in [0, 1), got {self.migrate_headroom}")
        if not self.cycle_window_s >= 0:
            raise ValueError(f"cycle_window_s: must be >= 0, got {self.cycle_window_s}")
        if not self.min_drop_gain > 0:
            raise ValueError(f"min_drop_gain: must be > 0, got {self.min_drop_gain}")
        if self.max_migrations_per_check < 1:
            raise ValueError(f"max_migrations_per_check: must be >= 1, got {self.max_migrations_per_check}")

    def planner_config(self, num_layers: int) -> PlannerConfig:
        """The planner's settings (it checks the shared ones)."""
        return PlannerConfig(num_layers, self.max_group_size, self.drop_headroom, self.restore_fill,
                             self.group_step_factor)
