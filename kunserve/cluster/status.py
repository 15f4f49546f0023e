"""What operators see of a cluster: each replica's mode, layers and load, the groups and the
recent transitions (GET /v1/cluster, the kunserve:* gauges, bench timelines)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

from kunserve.cluster.runner import TransitionRunner

PIPELINE_MODE = "pipeline"  # a replica fused into a group by a drop
REPLICA_MODE = "replica"
FUSING = ("drop", "grow")  # transitions that fuse replicas into a group
RELEASING = ("restore", "shrink")  # and that let replicas out of one


def mode_of(runner: TransitionRunner, replica: int) -> str:
    return REPLICA_MODE if runner.group_of(replica) is None else PIPELINE_MODE


def layers_held(runner: TransitionRunner, replica: int) -> int:
    num_layers = runner.cluster.engines[replica].spec.num_layers
    group = runner.group_of(replica)
    return num_layers if group is None else num_layers // len(group.members)


def describe(runner: TransitionRunner, overload_policy: str) -> dict:
    cluster = runner.cluster
    replicas = []
    for i in range(len(cluster.engines)):
        engine = runner.engine_of(i)
        replicas.append({
            "replica": i,
            "mode": mode_of(runner, i),
            "alive": cluster.replicas[i].is_alive,  # false while its workers restart
            "restarts": runner.restarts[i],  # times its workers failed and were replaced
            "layers_held": layers_held(runner, i),
            "kv_usage": engine.block_manager.usage,
            "queued_demand_blocks": engine.scheduler.num_waiting_blocks,
            "num_running": len(engine.scheduler.running),
            "num_waiting": len(engine.scheduler.waiting),
            # Why its queue waited in its last step: kv_blocks, seq_slots, token_budget (None: nothing queued).
            "waiting_for": engine.scheduler.last_stall,
        })
    groups = [
        {
            "members": group.members,
            "kv_usage": group.engine.block_manager.usage,
            "kv_blocks": group.engine.block_manager.num_total_blocks,
            "queued_demand_blocks": group.engine.scheduler.num_waiting_blocks,
            "running": len(group.engine.scheduler.running),
            "waiting_for": group.engine.scheduler.last_stall,
        }
        for group in list(runner.groups)
    ]
    return {
        "overload_policy": overload_policy,
        "replicas": replicas,
        "groups": groups,
        "transitions": [asdict(t) for t in list(runner.history)],  # a copy: the coordinator thread appends
    }


def count_cycles(transitions: Iterable[Mapping[str, Any]], window_s: float) -> int:
    """Drop-restore-drop cycles among `transitions` (as asdict(Transition) gives them, in the
    order they ended): fusions (drops, growths) that took in a replica a restore or shrink
    had let out of its group less than `window_s` before the fusion began."""
    released_at: dict[int, float] = {}
    cycles = 0
    for t in transitions:
        began = t["at"] - t["duration_s"]
        if t["kind"] in FUSING and any(began - released_at.get(m, -float("inf")) < window_s for m in t["members"]):
            cycles += 1
        if t["kind"] in RELEASING:
            released_at.update(dict.fromkeys(t["members"], t["at"]))
    return cycles
