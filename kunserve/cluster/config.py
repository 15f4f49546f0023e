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
    drop_after_s: float = 0.2  # queued demand above free blocks this long: drop (or migrate)
    restore_after_s: float = 2.0  # demand within restore_fill of replica capacity this long: restore
    restore_fill: float = 0.5
    migrate_headroom: float = 0.1  # a migration's destination keeps this fraction of its KV blocks free
    max_migrations_per_check: int = 8
    # A drop's group starts at once, queued requests admitted, and moves the running requests'
    # KV between its steps (each runs again once its KV has arrived); False: the drop waits
    # for the whole exchange (kunserve/cluster/exchange.py).
    overlap_exchange: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.migrate_headroom < 1:
            raise ValueError(f"migrate_headroom: must be in [0, 1), got {self.migrate_headroom}")
        if self.max_migrations_per_check < 1:
            raise ValueError(f"max_migrations_per_check: must be >= 1, got {self.max_migrations_per_check}")

    def planner_config(self, num_layers: int) -> PlannerConfig:
        """The planner's settings (it checks the shared ones)."""
        return PlannerConfig(num_layers, self.max_group_size, self.drop_headroom, self.restore_fill)
