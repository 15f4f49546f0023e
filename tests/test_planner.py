"""The drop planner: which replicas fuse, and into groups how large."""

import numpy as np
import pytest

from kunserve.cluster.planner import Planner, PlannerConfig, ReplicaLoad
from kunserve.engine.cost_model import CostModel
from kunserve.model.presets import resolve_model

NUM_LAYERS = 32  # group sizes 2, 4, 8, 16, 32
WEIGHT_BLOCKS = 100  # a drop into g stages frees 100·(g-1)/g blocks per member
CAPACITY = 200


def planner(**config) -> Planner:
    spec = resolve_model("llama-3-8b").spec
    return Planner(PlannerConfig(NUM_LAYERS, drop_headroom=0.0, **config), CostModel.default(spec, "llama-3-8b"))


def load(replica: int, demand: int, host: int = 0) -> ReplicaLoad:
    return ReplicaLoad(replica, demand, CAPACITY, WEIGHT_BLOCKS, running=8, context_tokens=8 * 512, host=host)


def test_no_group_when_no_replica_is_overloaded() -> None:
    assert planner().plan_drops([load(0, 200), load(1, 150), load(2, 0)]) == []


def test_an_overloaded_replica_fuses_with_the_replica_that_has_most_spare_memory() -> None:
    groups = planner().plan_drops([load(0, 260), load(1, 150), load(2, 20), load(3, 100)])
    assert [g.members for g in groups] == [[0, 2]]


def test_the_group_is_the_smallest_allowed_size_that_covers_the_deficit() -> None:
    # Pair: 2·200 + 2·50 = 500 blocks < 260 + 250 demand; four: 800 + 4·75 = 1100 >= 260 + 3·250.
    loads = [load(0, 260), load(1, 250), load(2, 250), load(3, 250), load(4, 250)]
    groups = planner().plan_drops(loads)
    assert len(groups) == 1 and len(groups[0].members) == 4
    assert groups[0].capacity_blocks >= groups[0].demand_blocks


def test_group_capacity_adds_the_released_share_of_each_members_weights() -> None:
    p = planner()
    assert p.group_capacity([load(0, 0), load(1, 0)]) == 2 * CAPACITY + 2 * 50
    assert p.group_capacity([load(i, 0) for i in range(4)]) == 4 * CAPACITY + 4 * 75


def test_each_overloaded_replica_gets_its_own_small_group() -> None:
    loads = [load(0, 230), load(1, 240), load(2, 0), load(3, 10), load(4, 100)]
    groups = planner().plan_drops(loads)
    assert sorted(sorted(g.members) for g in groups) == [[0, 3], [1, 2]]


def test_partners_on_the_same_host_come_first() -> None:
    loads = [load(0, 230, host=0), load(1, 0, host=1), load(2, 10, host=0)]
    (group,) = planner().plan_drops(loads)
    assert group.members == [0, 2] and not group.spans_hosts


def test_a_group_across_hosts_is_predicted_slower_than_one_on_a_host() -> None:
    p = planner()
    members = [load(0, 230), load(1, 10)]
    assert p.predicted_slowdown(members, spans_hosts=True) > p.predicted_slowdown(members, spans_hosts=False) > 1


def test_groups_never_exceed_max_group_size() -> None:
    loads = [load(0, 1000)] + [load(i, 0) for i in range(1, 16)]
    (group,) = planner(max_group_size=4).plan_drops(loads)
    assert len(group.members) == 4


def test_group_sizes_divide_the_layers() -> None:
    assert PlannerConfig(num_layers=12).group_sizes(8) == [2, 3, 4, 6]


def test_restore_is_worth_it_only_when_demand_fits_the_replicas_comfortably() -> None:
    p = planner(restore_fill=0.5)
    members = [load(0, 0), load(1, 0)]
    assert p.restore_is_worth(200, members)
    assert not p.restore_is_worth(201, members)


def test_planning_1024_replicas_gives_disjoint_groups() -> None:
    # How long it takes is a benchmark figure (benchmarks/planner_scaling.py), not a test.
    rng = np.random.default_rng(0)
    loads = [load(i, int(d), host=i // 8) for i, d in enumerate(rng.integers(0, 320, 1024))]
    groups = planner().plan_drops(loads)
    assert groups
    members = [m for g in groups for m in g.members]
    assert len(members) == len(set(members))


def test_max_group_size_below_two_is_refused() -> None:
    with pytest.raises(ValueError, match="max_group_size"):
        PlannerConfig(NUM_LAYERS, max_group_size=1)
