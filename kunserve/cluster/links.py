"""Which path a copy between two replicas' devices takes, and opening those paths.

Devices of one host copy straight from each other's arenas, mapped into the reader's process
once (CUDA IPC; shared memory on CPU): the destination pulls, the source does nothing.
Devices on two hosts (Ray nodes) cannot map each other's memory: the bytes go over
torch.distributed point-to-point, the source posting a send and the destination a receive
at once (kunserve/worker/peers.py).
"""

from __future__ import annotations

from kunserve.executor.base import THIS_HOST, Executor, Pending, WorkerExecutor
from kunserve.worker.protocol import DeviceCalls


def host_of(executor: Executor) -> str:
    """The host of an executor's first device."""
    return executor.hosts[0] if isinstance(executor, WorkerExecutor) else THIS_HOST


def share_host(a: WorkerExecutor, b: WorkerExecutor) -> bool:
    """Whether two one-device replicas can map each other's arenas."""
    return host_of(a) == host_of(b)


def replica_device(executor: Executor, purpose: str) -> WorkerExecutor:
    """`executor` as a one-device replica whose device takes DeviceCalls (what drops, restores
    and migrations work on); ValueError naming `purpose` otherwise."""
    if not isinstance(executor, WorkerExecutor) or executor.num_stages != 1:
        raise ValueError(f"{purpose}: replicas must be one device each, whose devices take calls")
    return executor


def post_kv_copy(src: WorkerExecutor, dst: WorkerExecutor, sources: list[int], targets: list[int]) -> list[Pending[None]]:
    """Start copying the KV of (sub-)blocks `sources` on src's device into `targets` on dst's;
    returns the calls whose completion ends it. Several copies are posted in one order (of
    their device pairs), so that no two devices wait for each other's sends in a cycle."""
    if share_host(src, dst):
        return [dst.post(0, DeviceCalls.pull_kv, src.global_ranks[0], sources, targets)]
    return [src.post(0, DeviceCalls.send_kv, dst.global_ranks[0], sources),
            dst.post(0, DeviceCalls.recv_kv, src.global_ranks[0], targets)]


class Links:
    """Which replicas' devices can copy between each other, opened once per pair: each maps the
    other's arena where they share a host, and both open their link. A replica whose workers
    are replaced (`forget`) leaves its peers with stale links to the old ones, which are closed
    before they link again (`close_stale`)."""

    def __init__(self) -> None:
        self._arena_handles: dict[int, bytes] = {}
        self._open_pairs: set[tuple[int, int]] = set()
        self._stale: dict[int, set[int]] = {}  # by replica: global ranks of gone peers it still links to

    def are_open(self, a: int, b: int) -> bool:
        return (min(a, b), max(a, b)) in self._open_pairs

    def mark_open(self, a: int, b: int) -> None:
        """Count a pair as opened beforehand (a simulation's links opened before its replay)."""
        self._open_pairs.add((min(a, b), max(a, b)))

    def forget(self, replica: int, gone_rank: int) -> None:
        """The replica's device (global rank `gone_rank`) is gone: its pairs close, and each
        peer it was linked to has a stale link to close."""
        self._arena_handles.pop(replica, None)
        self._stale.pop(replica, None)
        for pair in [pair for pair in self._open_pairs if replica in pair]:
            self._open_pairs.discard(pair)
            peer = pair[0] if pair[1] == replica else pair[1]
            self._stale.setdefault(peer, set()).add(gone_rank)

    def has_stale(self, replica: int) -> bool:
        return bool(self._stale.get(replica))

    def close_stale(self, replica: int, executor: Executor) -> None:
        """Unmap the gone peers' arenas on this replica's device and close its links to them
        (its engine loop paused, or not started)."""
        device = replica_device(executor, "close_stale")
        for rank in sorted(self._stale.pop(replica, set())):
            device.call(0, DeviceCalls.close_peer, rank)

    def open(self, executors: dict[int, Executor]) -> None:
        """Open every pair among these replicas (by index) not yet open. Their engine loops
        must be paused (or not started): the calls run on their devices."""
        devices = {i: replica_device(executor, "open_links") for i, executor in executors.items()}
        for i in sorted(devices):
            if self.has_stale(i):
                self.close_stale(i, devices[i])
        for i in sorted(devices):
            for j in sorted(devices):
                if i < j and not self.are_open(i, j):
                    self._open_pair(i, devices[i], j, devices[j])

    def _open_pair(self, i: int, a: WorkerExecutor, j: int, b: WorkerExecutor) -> None:
        if share_host(a, b):
            a.call(0, DeviceCalls.open_peer, b.global_ranks[0], self._arena_handle(j, b))
            b.call(0, DeviceCalls.open_peer, a.global_ranks[0], self._arena_handle(i, a))
        sending = a.post(0, DeviceCalls.warm_link, b.global_ranks[0], True)
        receiving = b.post(0, DeviceCalls.warm_link, a.global_ranks[0], False)
        sending.wait()
        receiving.wait()
        self.mark_open(i, j)

    def _arena_handle(self, replica: int, device: WorkerExecutor) -> bytes:
        if replica not in self._arena_handles:
            self._arena_handles[replica] = device.call(0, DeviceCalls.export_arena)
        return self._arena_handles[replica]
