"""The drop planner: which replicas fuse, and into groups how large."""

import numpy as np
import pytest

from kunserve.cluster.planner import GroupLoad, Planner, PlannerConfig, ReplicaLoad
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


def group_of(members: list[int], demand: int, seqs: int = 0) -> GroupLoad:
    return GroupLoad([ReplicaLoad(m, 0, CAPACITY, WEIGHT_BLOCKS, seq_capacity=16) for m in members], demand, seqs)


def test_a_group_that_sequence_slots_do_not_fit_takes_more_members() -> None:
    # Blocks fit a pair; 40 requests need three replicas' 16 slots: the smallest size covering both is four.
    loads = [ReplicaLoad(i, 10, CAPACITY, WEIGHT_BLOCKS, seqs=40 if i == 0 else 0, seq_capacity=16) for i in range(6)]
    (group,) = planner().plan_drops(loads, due={0})
    assert len(group.members) == 4


def test_an_overloaded_group_grows_with_free_replicas_of_its_host_first() -> None:
    free = [load(4, 0, host=1), load(5, 100, host=0), load(6, 150, host=0), load(7, 0, host=1)]
    planned = planner().plan_growth(group_of([0, 1], 520), free, [])
    assert planned is not None and planned.members == [0, 5, 1, 6] and planned.absorbs == ()


def test_a_group_grows_by_the_smallest_factor_that_covers_its_demand() -> None:
    free = [load(i, 0) for i in range(2, 16)]
    # Pair: 500 blocks. Four stages: 800 + 300 = 1100. Eight: 1600 + 700 = 2300.
    assert len(planner().plan_growth(group_of([0, 1], 1000), free, []).members) == 4
    assert len(planner().plan_growth(group_of([0, 1], 2000), free, []).members) == 8


def test_a_group_with_no_free_replicas_merges_the_group_with_most_spare_memory() -> None:
    others = [group_of([2, 3], 480), group_of([4, 5], 100), group_of([6, 7, 8, 9], 0)]
    planned = planner().plan_growth(group_of([0, 1], 520), [], others)
    assert planned is not None and planned.members == [0, 4, 1, 5] and planned.absorbs == (1,)


def test_no_growth_beyond_max_group_size() -> None:
    free = [load(i, 0) for i in range(2, 6)]
    assert planner(max_group_size=2).plan_growth(group_of([0, 1], 2000), free, []) is None


def test_restore_waits_until_the_requests_fit_half_the_sequence_slots_too() -> None:
    p = planner(restore_fill=0.5)
    members = [ReplicaLoad(i, 0, CAPACITY, WEIGHT_BLOCKS, seq_capacity=16) for i in range(2)]
    assert p.restore_is_worth(10, members, seqs=16)
    assert not p.restore_is_worth(10, members, seqs=17)


def queued_load(replica: int, running: int, queued: int, context: int = 1024) -> ReplicaLoad:
    return ReplicaLoad(replica, 0, CAPACITY, WEIGHT_BLOCKS, running=running, context_tokens=running * context,
                       seqs=running + queued, seq_capacity=256, queued_tokens=queued * context)


def test_a_drop_that_admits_a_long_queue_beside_few_running_requests_gains_throughput() -> None:
    # Memory-bound: 16 running each, 100 queued each; the pair runs them all.
    assert planner().drop_gain([queued_load(0, 16, 100), queued_load(1, 16, 100)]) > 1


def test_a_drop_of_replicas_whose_slots_are_full_loses_throughput() -> None:
    # 256 running each (their sequence slots), the queue stays queued: the pipeline only costs.
    p = planner(group_step_factor=1.22)
    assert p.drop_gain([queued_load(0, 256, 50), queued_load(1, 256, 50)]) < 1
