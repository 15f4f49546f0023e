"""Which path a copy between two replicas' devices takes (drops, restores, migrations).

Devices of one host copy straight from each other's arenas, mapped into the reader's process
once (CUDA IPC; shared memory on CPU): the destination pulls, the source does nothing.
Devices on two hosts (Ray nodes) cannot map each other's memory: the bytes go over
torch.distributed point-to-point, the source posting a send and the destination a receive
at once (kunserve/worker/drop.py's send_kv / recv_kv).
"""

from __future__ import annotations

from kunserve.executor.base import THIS_HOST, Executor, WorkerExecutor


def host_of(executor: Executor) -> str:
    """The host of an executor's first device."""
    return executor.hosts[0] if isinstance(executor, WorkerExecutor) else THIS_HOST


def share_host(a: WorkerExecutor, b: WorkerExecutor) -> bool:
    """Whether two one-device replicas can map each other's arenas."""
    return host_of(a) == host_of(b)


def post_kv_copy(
    src: WorkerExecutor, dst: WorkerExecutor, sources: list[int], targets: list[int]
) -> list[WorkerExecutor]:
    """Start copying the KV of (sub-)blocks `sources` on src's device into `targets` on dst's;
    returns the executors whose results end it. Several copies are posted in one order (of
    their device pairs), so that no two devices wait for each other's sends in a cycle."""
    if share_host(src, dst):
        dst.post(0, "pull_kv", src.global_ranks[0], sources, targets)
        return [dst]
    src.post(0, "send_kv", dst.global_ranks[0], sources)
    dst.post(0, "recv_kv", src.global_ranks[0], targets)
    return [src, dst]
