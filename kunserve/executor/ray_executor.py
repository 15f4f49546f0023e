"""One model on Ray actors, one per device, on the nodes of a Ray cluster: a single device,
or a pipeline of g stages, driven exactly as worker processes are (WorkerSetExecutor), with
Ray actor calls for the pipes.

A replica's devices are placed together by a placement group (`ray_placement_strategy`:
STRICT_PACK, all on one node, by default; SPREAD and STRICT_SPREAD stretch a pipeline over
nodes). Actors link to each other as worker processes do (kunserve/worker/peers.py: gloo on
CPU, NCCL on GPU), meeting at the rendezvous store this driver hosts. An actor that dies fails
the call waiting on it at once, naming the worker, as a dead worker process does; one that
does not answer within worker_timeout_s is killed as hung.

Ray is an optional extra (`pip install kunserve[ray]`): only this module imports it, and
only the "ray" executor backend imports this module.
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

try:
    import ray
except ImportError as missing:
    raise ImportError("distributed_executor_backend='ray' needs Ray: pip install 'kunserve[ray]'") from missing
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from kunserve.config import EngineConfig
from kunserve.executor.rendezvous import Rendezvous
from kunserve.executor.worker_set import WorkerSetExecutor, stage_assignments
from kunserve.executor.workers import SHUTDOWN_GRACE_S, StartCancelled, WorkerSet
from kunserve.model.presets import ResolvedModel
from kunserve.worker.protocol import Command, WorkerWorld
from kunserve.worker.ray_worker import RayWorker

logger = logging.getLogger(__name__)

RemoteWorker = ray.remote(RayWorker)

CPUS_PER_WORKER = 1  # Ray CPUs each worker reserves (its torch threads: EngineConfig.worker_threads)
PLACEMENT_TIMEOUT_S = 60.0  # how long Ray may take to find room for a replica's devices
# Ray sets CUDA_VISIBLE_DEVICES to an actor's own GPU; with this set it leaves every GPU of
# the node visible, so that workers of one node can map each other's arenas (CUDA IPC).
KEEP_VISIBLE_DEVICES = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}


def connect(address: str | None) -> None:
    """Attach this process to the Ray cluster at `address` (None: RAY_ADDRESS, else a new
    local one), once."""
    if not ray.is_initialized():
        ray.init(address=address)


def driver_address(config: EngineConfig) -> str:
    """This driver's address as every node of the Ray cluster reaches it (where the workers'
    rendezvous store listens)."""
    connect(config.ray_address)
    return ray.util.get_node_ip_address()


@dataclass
class RayWorkerHandle:
    actor: ray.actor.ActorHandle
    global_rank: int  # among the cluster's workers (kunserve/executor/rendezvous.py)
    node_id: str = ""  # the Ray node it runs on
    pid: int | None = None
    pending: deque[ray.ObjectRef] = field(default_factory=deque)  # calls made, their replies unread, oldest first
    inbox: deque[tuple[str, Any]] = field(default_factory=deque)  # read, not yet asked for

    @property
    def name(self) -> str:
        return f"worker {self.global_rank} (Ray actor, pid {self.pid} on node {self.node_id[:8]})"


class RayWorkerSet(WorkerSet):
    """The control channel over Ray: each command one actor call, its reply the call's result.
    A call that fails (the actor died, or the command raised) fails the set at once."""

    handles: list[RayWorkerHandle]  # type: ignore[assignment]

    def __init__(self, handles: list[RayWorkerHandle], timeout_s: float, tp_size: int = 1) -> None:
        super().__init__(handles, timeout_s, tp_size)  # type: ignore[arg-type]
        self._stop_requested = False

    def send(self, index: int, message: bytes) -> None:
        self.call_actor(index, "handle", message)

    def call_actor(self, index: int, method: str, *args: Any) -> None:
        """Call the actor's `method`; its reply, unless None, is read in turn like a command's."""
        self._raise_if_failed()
        handle = self.handles[index]
        handle.pending.append(getattr(handle.actor, method).remote(*args))

    def _read_any(self, timeout_s: float) -> bool:
        oldest = {h.pending[0]: h for h in self.handles if h.pending}
        if not oldest:
            raise RuntimeError("a reply is awaited that no call made will send")
        ready, _ = ray.wait(list(oldest), num_returns=1, timeout=max(0.0, timeout_s))
        for ref in ready:
            handle = oldest[ref]
            handle.pending.popleft()
            try:
                reply = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                # Ray's first line says why; a worker that failed to start gets its traceback.
                reason = str(error) if error.actor_init_failed else str(error).splitlines()[0]
                self.fail(f"{handle.name} died: {reason}")
            except ray.exceptions.RayError as error:  # the command raised: its traceback
                self.fail(f"{handle.name} failed:\n{error}")
            if reply is not None:
                handle.inbox.append(reply)
        return bool(ready)

    def exited(self) -> str | None:
        """Ray reports an actor's death at the next call on it: only a failure seen so far."""
        return self.failure

    def request_shutdown(self) -> None:
        if self.failure is not None or self._stop_requested:
            return
        self._stop_requested = True
        message = pickle.dumps((Command.SHUTDOWN, None), protocol=pickle.HIGHEST_PROTOCOL)
        for handle in self.handles:
            handle.pending.append(handle.actor.handle.remote(message))

    def shutdown(self) -> None:
        self.request_shutdown()
        refs = [ref for handle in self.handles for ref in handle.pending]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_GRACE_S)
        self._kill_all()

    def _kill_all(self) -> None:
        for handle in self.handles:
            ray.kill(handle.actor)


class RayExecutor(WorkerSetExecutor):
    def __init__(self, config: EngineConfig, model: ResolvedModel, world: WorkerWorld | None = None,
                 stop: threading.Event | None = None) -> None:
        """`world`: this executor's place among a cluster's workers; None: its devices link only
        to each other. `stop`: once set, the start is called off (StartCancelled)."""
        super().__init__()
        if stop is not None and stop.is_set():  # before connecting: Ray may be shut down already
            raise StartCancelled("called off before its workers started")
        connect(config.ray_address)
        if world is None and config.devices_per_replica > 1:
            # The stages meet at a store of their own, which lives as long as this executor.
            self._rendezvous = Rendezvous(config.worker_timeout_s, driver_address(config))
            world = self._rendezvous.world(config.devices_per_replica)
        stages = stage_assignments(config, model, world)
        placement = place_devices(config, len(stages))
        self._placement: PlacementGroup | None = placement
        on_gpu = config.resolve_device().type == "cuda"
        handles = []
        for stage in stages:
            actor = RemoteWorker.options(
                num_cpus=CPUS_PER_WORKER,
                num_gpus=1 if on_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement,
                                                                     placement_group_bundle_index=stage.device_index),
                runtime_env={"env_vars": KEEP_VISIBLE_DEVICES} if on_gpu else None,
            ).remote(config, model, stage)
            handles.append(RayWorkerHandle(actor, stage.global_rank))
        self.workers = RayWorkerSet(handles, config.worker_timeout_s, config.tensor_parallel_size)
        for rank in range(len(handles)):
            self.workers.call_actor(rank, "ready")
        self._await_ready(config, stop)
        for handle, (node_id, pid) in zip(handles, ray.get([h.actor.identity.remote() for h in handles])):
            handle.node_id, handle.pid = node_id, pid
        logger.info("%d Ray worker(s) ready: %s", len(handles), ", ".join(h.name for h in handles))

    @property
    def hosts(self) -> list[str]:
        return [handle.node_id for handle in self.workers.handles]

    def shutdown(self) -> None:
        self.workers.shutdown()
        if self._placement is not None:  # once: a failed replica's is removed before its restart
            remove_placement_group(self._placement)
            self._placement = None


def place_devices(config: EngineConfig, num_devices: int) -> PlacementGroup:
    """A placement group of one bundle per device, placed by `config.ray_placement_strategy`."""
    bundle = {"CPU": CPUS_PER_WORKER, **({"GPU": 1} if config.resolve_device().type == "cuda" else {})}
    group = placement_group([bundle] * num_devices, strategy=config.ray_placement_strategy)
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(group)
        raise RuntimeError(
            f"ray_placement_strategy: Ray found no room for {num_devices} x {bundle} ({config.ray_placement_strategy}) "
            f"within {PLACEMENT_TIMEOUT_S:.0f} s; the cluster has {ray.available_resources()}"
        )
    return group
