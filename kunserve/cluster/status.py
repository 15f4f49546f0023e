"""What operators see of a cluster: each replica's mode, layers and load, the groups and the
recent transitions (GET /v1/cluster, the kunserve:* gauges, bench timelines)."""

from __future__ import annotations

from dataclasses import asdict

from kunserve.cluster.runner import TransitionRunner

PIPELINE_MODE = "pipeline"  # a replica fused into a group by a drop
REPLICA_MODE = "replica"


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
        })
    groups = [
        {
            "members": group.members,
            "kv_usage": group.engine.block_manager.usage,
            "kv_blocks": group.engine.block_manager.num_total_blocks,
            "queued_demand_blocks": group.engine.scheduler.num_waiting_blocks,
            "running": len(group.engine.scheduler.running),
        }
        for group in list(runner.groups)
    ]
    return {
        "overload_policy": overload_policy,
        "replicas": replicas,
        "groups": groups,
        "transitions": [asdict(t) for t in list(runner.history)],  # a copy: the coordinator thread appends
    }
