"""Recovery: a replica whose workers fail is restarted on new workers and serves again.

A worker that dies, fails or hangs (it misses EngineConfig.worker_timeout_s and is killed)
takes down the loop that steps its device: the requests whose state was on the devices end
with the error, and those that never started run on the other replicas (kunserve/engine/
async_engine.py). The loop reports the failure here, and so does a health check that finds a
worker that exited while its replica was idle. Recovery then, on a thread of its own:

* holds the replicas concerned (waiting for a transition on them to end, which it soon does:
  their devices are gone). A group that lost a member is dissolved and every member restarts:
  the survivors released their other layers for the group, and simplest and surely correct is
  to start them afresh rather than refill those layers from a checkpoint while their links to
  the dead member may still be in use;
* stops what is left of their workers, and has every other replica close its links to them
  (now where the replica is free, else before it next links: kunserve/cluster/links.py), so no
  worker keeps a dead peer's memory mapped;
* starts new workers for each replica (weights loaded again, new global ranks, so no link is
  mistaken for one of the old workers'), side by side, and revives the replicas' loops on new
  engines; the dispatcher sends them requests again, and their links open at the next
  transition that needs them.

The restart is a transition in the runner's history (kind "restart", its duration from the
failure to serving again), and GET /v1/cluster counts each replica's restarts.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from kunserve.cluster.coordinator import Coordinator
from kunserve.cluster.view import ClusterView, ReplicaLoop
from kunserve.engine.async_engine import STOP_GRACE_S
from kunserve.engine.llm_engine import LLMEngine
from kunserve.executor.base import WorkerExecutor
from kunserve.executor.workers import StartCancelled, WorkerDiedError

logger = logging.getLogger(__name__)

HEALTH_CHECK_S = 0.5  # how often idle replicas' workers are looked at (a busy replica sees a death at once)
RESTART_RETRY_S = 5.0  # how long after a restart that failed (e.g. a worker that did not start) the next try


class RestartableCluster(ClusterView, Protocol):
    """What recovery needs of a live cluster (kunserve/cluster/cluster.py)."""

    coordinator: Coordinator

    def new_engine(self, index: int, stop: threading.Event | None = None) -> LLMEngine:
        """Replica `index`'s engine on new workers; StartCancelled once `stop` is set."""
        ...

    def revive(self, engines: dict[int, LLMEngine]) -> bool:
        """Put these replicas back in service on their new engines; False when shutting down."""
        ...


class Recovery:
    def __init__(self, cluster: RestartableCluster) -> None:
        self.cluster = cluster
        self._due: queue.SimpleQueue[tuple[int, BaseException, float]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kunserve-recovery", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()

    def join(self) -> None:
        """Wait for a restart under way, a bounded time: the start of its new workers is called
        off once a stop is requested (StartCancelled), and they are stopped."""
        if self._thread is not None:
            self._thread.join(STOP_GRACE_S)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def replica_failed(self, replica: int, error: BaseException) -> None:
        """Replica `replica`'s loop went down with `error`: restart it (any thread)."""
        self._due.put((replica, error, self.cluster.clock()))

    # ---- the recovery thread ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                due = [self._due.get(timeout=HEALTH_CHECK_S)]
            except queue.Empty:
                try:
                    self._check_workers()
                except Exception:
                    logger.exception("the health check failed; will look again")
                continue
            while not self._due.empty():
                due.append(self._due.get())
            try:
                self._restart(due)
            except Exception:
                logger.exception("restarting replicas %s failed; trying again in %.0f s",
                                 sorted({replica for replica, _, _ in due}), RESTART_RETRY_S)
                if not self._stop.wait(RESTART_RETRY_S):
                    for entry in due:
                        self._due.put(entry)

    def _check_workers(self) -> None:
        """Take down a serving replica one of whose workers has exited unnoticed (its loop had
        no step to run): its loop then reports the failure."""
        cluster, runner = self.cluster, self.cluster.coordinator.runner
        for index, engine in enumerate(list(cluster.engines)):
            loop = cluster.replicas[index]
            if not loop.is_alive or runner.is_held(index):
                continue  # down already, or a transition on it will see the death itself
            gone = engine.executor.exited()
            if gone is None:
                continue
            group = runner.group_of(index)
            stepping = loop if group is None else cluster.replicas[group.members[0]]
            stepping.pause()
            try:
                stepping.fail(WorkerDiedError(f"{gone} (found by the health check)"))
            finally:
                stepping.resume()

    def _restart(self, due: list[tuple[int, BaseException, float]]) -> None:
        cluster, runner = self.cluster, self.cluster.coordinator.runner
        members = self._replicas_to_restart(replica for replica, _, _ in due)
        if not members:
            return  # revived already (the failure of a group's member reported twice)
        failed_at = min(at for _, _, at in due)
        reason = "; ".join(sorted({str(error).splitlines()[0] for _, error, _ in due}))
        while not runner.hold(members, wait_s=HEALTH_CHECK_S):  # a transition on them ends soon
            if self._stop.is_set():
                return
        try:
            if self._replace_workers(members, due[0][1]):
                runner.record_restart(members, reason, cluster.clock() - failed_at)
        finally:
            runner.release(members)

    def _replicas_to_restart(self, reported: Iterable[int]) -> list[int]:
        """The reported replicas that are down, with every member of a group one of them ran."""
        cluster, runner = self.cluster, self.cluster.coordinator.runner
        chosen: set[int] = set()
        for replica in reported:
            group = runner.group_of(replica)
            if group is not None:
                chosen.update(group.members)
            elif not cluster.replicas[replica].is_alive:
                chosen.add(replica)
        return sorted(chosen)

    def _replace_workers(self, members: list[int], error: BaseException) -> bool:
        """Restart these (held) replicas; False when the cluster stopped meanwhile."""
        cluster, runner = self.cluster, self.cluster.coordinator.runner
        for group in {id(g): g for m in members if (g := runner.group_of(m)) is not None}.values():
            runner.dissolve(group)
        for m in members:
            cluster.replicas[m].fail(error)  # every member down, its workers stopped
            executor = cluster.engines[m].executor
            if isinstance(executor, WorkerExecutor) and executor.num_stages == 1:
                cluster.links.forget(m, executor.global_ranks[0])
        self._close_stale_links(exclude=set(members))
        logger.info("restarting replica(s) %s on new workers", members)
        with ThreadPoolExecutor(len(members), thread_name_prefix="kunserve-restart") as pool:
            # Called off when the cluster stops: a start may take up to worker_start_timeout_s.
            futures = {m: pool.submit(cluster.new_engine, m, self._stop) for m in members}
        failures = [failure for future in futures.values() if (failure := future.exception()) is not None]
        engines: dict[int, LLMEngine] = {m: f.result() for m, f in futures.items() if f.exception() is None}
        if failures or not cluster.revive(engines):
            for engine in engines.values():
                engine.shutdown()
            errors = [failure for failure in failures if not isinstance(failure, StartCancelled)]
            if errors:
                raise errors[0]
            return False
        logger.info("replica(s) %s serve again", members)
        return True

    def _close_stale_links(self, exclude: set[int]) -> None:
        """Have each free replica close its links to workers that are gone (a busy one closes
        them before it next links)."""
        cluster, runner = self.cluster, self.cluster.coordinator.runner
        for index in range(len(cluster.engines)):
            if index in exclude or not cluster.links.has_stale(index):
                continue
            group = runner.group_of(index)
            held = [index] if group is None else group.members
            try:
                with runner.holding(held):
                    stepping: ReplicaLoop = cluster.replicas[held[0]]
                    stepping.pause()
                    try:
                        if stepping.is_alive:
                            cluster.links.close_stale(index, cluster.engines[index].executor)
                    finally:
                        stepping.resume()
            except ValueError:
                continue  # in a transition now
            except Exception:
                logger.exception("replica %d could not close its links to gone workers", index)
