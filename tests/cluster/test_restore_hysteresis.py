"""When kunserve restores: when its group's forecast demand (running requests grown to their
expected ends, kunserve/cluster/demand.py) fits the replicas with a margin for the calm time,
which doubles with every drop-restore-drop cycle; so that a lull inside a burst, where the
demand of the moment fits but the running requests will grow again, splits nothing.
Cycles are counted from the transitions (kunserve/cluster/status.py)."""

from __future__ import annotations

import numpy as np

from kunserve import EngineConfig
from kunserve.bench.in_process import request_params
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.demand import forecast
from kunserve.cluster.policies.kunserve import KunServePolicy
from kunserve.cluster.status import count_cycles
from kunserve.sim.cluster import SimulatedCluster

WINDOW_S = 30.0
FIRST_WAVE_S, SECOND_WAVE_S = 80.0, 92.0
LONG_SHARE = 0.25  # of requests with long outputs: the burst is KV-bound, a drop pays
# The first wave arrives within this: fast enough to overflow the replicas' KV before they
# drain it (with the simulator's host time refitted on 2026-12-02, a 2 s wave no longer did).
FIRST_WAVE_SPREAD_S = 1.0


def transition(kind: str, members: list[int], began: float, took: float = 0.1) -> dict:
    return {"kind": kind, "members": members, "at": began + took, "duration_s": took}


def test_a_drop_soon_after_a_restore_of_its_replicas_is_a_cycle() -> None:
    history = [transition("drop", [0, 1], 0.0), transition("restore", [0, 1], 10.0), transition("drop", [1, 2], 20.0)]
    assert count_cycles(history, WINDOW_S) == 1


def test_a_drop_long_after_the_restore_or_of_other_replicas_is_no_cycle() -> None:
    history = [transition("drop", [0, 1], 0.0), transition("restore", [0, 1], 10.0), transition("drop", [2, 3], 12.0),
               transition("drop", [0, 1], 10.0 + WINDOW_S + 1)]
    assert count_cycles(history, WINDOW_S) == 0


def test_growing_again_soon_after_a_shrink_is_a_cycle() -> None:
    history = [transition("grow", [0, 2, 1, 3], 0.0), transition("shrink", [0, 2, 1, 3], 5.0),
               transition("grow", [0, 2, 1, 3], 8.0)]
    assert count_cycles(history, WINDOW_S) == 1


def test_each_cycle_in_a_row_doubles_the_calm_time_before_a_restore() -> None:
    cluster = SimulatedCluster(EngineConfig(model="llama-3-8b", num_kv_blocks=64), 4, CoordinatorConfig("kunserve"))
    policy = cluster.coordinator.policy
    assert isinstance(policy, KunServePolicy)
    base = policy.config.restore_after_s
    policy.note_fused([0, 1], 0.0)
    assert policy.calm_time([0, 1]) == base
    for cycle in (1, 2):
        policy.note_released([0, 1], 10.0 * cycle)
        policy.note_fused([0, 1], 10.0 * cycle + 1)
        assert policy.calm_time([0, 1]) == base * 2**cycle
    policy.note_released([0, 1], 40.0)
    policy.note_fused([0, 1], 40.0 + WINDOW_S + 1)  # after a long calm the count starts over
    assert policy.calm_time([0, 1]) == base


def burst_with_a_lull() -> tuple[list[float], list[int]]:
    """A minute of light traffic (so that the history knows long outputs), then two waves of
    a burst 12 s apart; LONG_SHARE of the requests are long. Arrivals and output lengths."""
    rng = np.random.default_rng(0)
    light = np.arange(120) * 0.5
    waves = [FIRST_WAVE_S + rng.uniform(0, FIRST_WAVE_SPREAD_S, 300), SECOND_WAVE_S + rng.uniform(0, 2, 300)]
    arrivals = np.sort(np.concatenate([light, *waves]))
    outputs = np.where(rng.random(len(arrivals)) < LONG_SHARE, 2000, 100)
    return arrivals.tolist(), outputs.tolist()


def test_a_lull_inside_a_burst_restores_nothing() -> None:
    arrivals, outputs = burst_with_a_lull()
    cluster = SimulatedCluster(EngineConfig(model="llama-3-8b", memory_budget_bytes=24 << 30, max_model_len=8192), 2,
                               CoordinatorConfig("kunserve", cycle_window_s=WINDOW_S))
    cluster.open_all_links()
    policy = cluster.coordinator.policy
    assert isinstance(policy, KunServePolicy)
    fits_now: list[tuple[float, bool]] = []  # while grouped: whether the demand of the moment fits half the replicas

    def sample(t: float) -> None:
        for group in cluster.coordinator.runner.groups:
            members = [policy.member_load(m) for m in group.members]
            demand = forecast(group.engine, policy.lengths)
            fits_now.append((t, policy.planner.restore_is_worth(demand.now_blocks, members, demand.seqs)))

    cluster.run(arrivals, [[0] * 500 for _ in arrivals], [request_params(n) for n in outputs], sample_every_s=0.25,
                sample=sample)
    history = [{"kind": t.kind, "members": t.members, "at": t.at, "duration_s": t.duration_s}
               for t in cluster.coordinator.runner.history]
    assert history and history[0]["kind"] == "drop"
    assert count_cycles(history, WINDOW_S) == 0
    # The trap: between the waves the demand of the moment fitted the replicas for longer than
    # the calm time; a restore judged on it would have split the group before the second wave.
    assert longest_run([(t, fits) for t, fits in fits_now if t < SECOND_WAVE_S]) > policy.config.restore_after_s


def longest_run(samples: list[tuple[float, bool]]) -> float:
    """The longest stretch of consecutive samples that were all True."""
    longest, start = 0.0, None
    for t, holds in samples:
        if holds:
            start = t if start is None else start
            longest = max(longest, t - start)
        else:
            start = None
    return longest
