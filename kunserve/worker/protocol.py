"""What the driver can ask of a device, one definition for every kind of device.

`DeviceCalls` lists the calls that drops, restores and migrations (kunserve/cluster/) make on a
device, one method each: a real device serves them in its worker process or Ray actor
(kunserve/worker/worker.py's `Worker`), a simulated one prices them on a virtual clock
(kunserve/sim/device.py). An executor carries a call as its method's name and arguments
(`WorkerExecutor.post(rank, DeviceCalls.pull_kv, ...)`), so a reader follows it from the caller
to this definition and on to each implementation.

The channel to a worker also carries steps and a few control messages (`Command`), answered
by `Reply`s; `WorkerWorld` and `StageAssignment` say where a worker stands in a cluster.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

# Seeded requests' random-stream states, by request id: opaque to the driver, which only
# passes them from the device that sampled to the one that samples next.
SamplerStates = dict[str, Any]


class DeviceCalls(ABC):
    """The named calls a device serves (a worker's device, or a simulated one).

    A tensor-parallel stage is one device to its callers: its executor sends a call to each of
    its ranks (kunserve/executor/tensor_parallel.py says how their replies combine), and a
    peer is named by its stage's first global rank: rank r of a stage talks to rank r of the
    peer, which holds the same shard."""

    # ---- memory: layers <-> KV (a replica alone) --------------------------------------------

    @abstractmethod
    def release_layer(self, layer: int) -> range:
        """Drop local layer `layer`'s weights; returns the block ids its bytes provide."""

    @abstractmethod
    def reclaim_layer(self, layer: int) -> None:
        """Take local layer `layer`'s bytes back from the KV pool and refill its weights."""

    # ---- role changes: the drop mechanism (kunserve/worker/drop.py) ---------------------------

    @abstractmethod
    def become_stage(self, stage: int, num_stages: int, prev_rank: int | None = None,
                     next_rank: int | None = None, refill_from: dict[int, int] | None = None,
                     back_rank: int | None = None) -> list[int]:
        """Hold stage `stage`'s layers of a `num_stages`-stage group and release the others (a
        replica dropping, a stage narrowing as its group grows); a stage widening as its group
        shrinks reclaims the layers it lacks and refills them from the global ranks
        `refill_from` names (peers on this host). Activations then come from global rank
        `prev_rank` and go to `next_rank`; sampled tokens go from the last stage back to the
        first (`back_rank`: the other end, on those two), for micro-batches scheduled ahead.
        Returns the sub-block ids all the released slots provide, as the device addresses its
        arena from now on."""

    @abstractmethod
    def become_replica(self, refill_from: dict[int, int] | None, over_network: list[int] | None = None) -> None:
        """Reclaim the released slots and refill their weights: layer k from global rank
        `refill_from[k]`, or all from the weight source when None. Peers in `over_network`
        (members on another host, restoring at the same time) swap layers over the network."""

    @abstractmethod
    def prepare_stages(self, group_sizes: list[int]) -> None:
        """Build the stage models (and capture their CUDA graphs) of every stage this replica may
        become in groups of these sizes, so a drop finds them ready."""

    # ---- links between devices ------------------------------------------------------------

    @abstractmethod
    def export_arena(self) -> bytes:
        """A handle to this device's arena that a peer on this host can map (`open_peer`)."""

    @abstractmethod
    def open_peer(self, peer: int, handle: bytes) -> None:
        """Map global rank `peer`'s arena (its `export_arena`) for direct copies, and set the
        path up with one small copy."""

    @abstractmethod
    def warm_link(self, peer: int, send: bool) -> None:
        """Open the point-to-point link with global rank `peer` (activations, and KV or weights
        across hosts), which `peer` opens at the same time, so it exists before a group's first
        step needs it (`send`: this end sends the first transfer)."""

    def close_peer(self, peer: int) -> None:
        """Forget global rank `peer` (it died, or its replica restarts): unmap its arena and
        close the link to it. A device that keeps no links has nothing to do."""

    # ---- KV copies ------------------------------------------------------------------------

    @abstractmethod
    def pull_kv(self, peer: int, src_ids: list[int], dst_ids: list[int], staging_bytes: int | None = None) -> None:
        """Copy (sub-)blocks `src_ids` of global rank `peer`'s mapped arena (seen as this
        device sees its own now) into `dst_ids` here, at most `staging_bytes` at a time."""

    @abstractmethod
    def send_kv(self, peer: int, ids: list[int], staging_bytes: int | None = None) -> None:
        """Send (sub-)blocks `ids` to global rank `peer` on another host, which runs `recv_kv`
        at the same time with the same `staging_bytes`."""

    @abstractmethod
    def recv_kv(self, peer: int, ids: list[int], staging_bytes: int | None = None) -> None:
        """Receive into (sub-)blocks `ids` what global rank `peer` sends with `send_kv`."""

    @abstractmethod
    def move_kv(self, src_ids: list[int], dst_ids: list[int]) -> None:
        """Copy (sub-)blocks `src_ids` into `dst_ids` on this device (they must not overlap)."""

    # ---- requests' sampler state ----------------------------------------------------------

    @abstractmethod
    def take_sampler_states(self, request_ids: list[str]) -> SamplerStates:
        """Seeded requests' random streams, leaving this device with them."""

    @abstractmethod
    def give_sampler_states(self, states: SamplerStates) -> None:
        """Random streams taken from another device by `take_sampler_states`."""

    # ---- checks ---------------------------------------------------------------------------

    @abstractmethod
    def kv_digests(self, ids: list[int]) -> list[str]:
        """A digest of each (sub-)block's bytes, to check transfers bit for bit."""

    @abstractmethod
    def weight_digests(self) -> list[str]:
        """A digest of each layer slot's bytes (the weights, when the layer is held)."""


DEVICE_CALLS = frozenset(name for name in vars(DeviceCalls) if not name.startswith("_"))


# Calls that do a worker's start-up work over again, however they are called: the whole arena
# moved into shared memory (export_arena, the first time), every stage model a replica may
# become built and its graphs captured (prepare_stages).
START_WORK_CALLS = frozenset({DeviceCalls.export_arena.__name__, DeviceCalls.prepare_stages.__name__})


def takes_start_deadline(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether call `name` may take as long as a worker's start, and has its deadline
    (EngineConfig.worker_start_timeout_s) instead of a step's: it reads weights from the
    checkpoint (a layer reclaimed, or a refill with no peer to copy from) or does start-up
    work (START_WORK_CALLS)."""
    if name == "become_replica":
        return (args[0] if args else kwargs.get("refill_from")) is None
    return name == "reclaim_layer" or name in START_WORK_CALLS


def check_device_call(name: str) -> str:
    """`name` if it is one of DeviceCalls' methods (a channel never runs anything else)."""
    if name not in DEVICE_CALLS:
        raise ValueError(f"{name!r} is not a device call; expected one of {sorted(DEVICE_CALLS)}")
    return name


class Command:
    """What the driver sends a worker over its channel: (command, argument)."""

    EXECUTE = "execute"  # a StepInput; the last stage replies SAMPLED
    # A group's step: (this stage's index, the same bytes for every stage: the StepInput and
    # every stage's block tables and KV slots, pickled once); as EXECUTE otherwise
    EXECUTE_STAGED = "execute_staged"
    CALL = "call"  # (DeviceCalls method name, args, kwargs); replies RETURNED
    TAKE_BUSY_S = "take_busy_s"  # replies BUSY_S: seconds computed since the last take
    SHUTDOWN = "shutdown"  # unmap peers and exit; no reply


class Reply:
    """What a worker sends back: (reply, payload)."""

    READY = "ready"  # the worker's ArenaLayout, once at start
    SAMPLED = "sampled"  # (token ids, busy seconds) of the oldest step
    RETURNED = "returned"  # a CALL's result
    BUSY_S = "busy_s"
    ERROR = "error"  # a traceback: the worker failed


@dataclass(frozen=True)
class WorkerWorld:
    """Where the workers of a cluster meet to open links to each other: a rendezvous store the
    driver hosts (kunserve/executor/rendezvous.py), and the global ranks of an executor's
    devices. A global rank names one worker for its whole life: a replica that restarts gets
    new ones, so a link is never confused with the one its predecessor had."""

    store_address: str  # host:port of the driver's rendezvous store
    first_rank: int  # the global rank of this executor's device 0 (stage 0, tensor-parallel rank 0)
    # How long a link's operation (opening it, a send or a receive) waits for its peer before
    # failing: a peer that died or hangs ends the wait instead of blocking this worker.
    link_timeout_s: float
    # The replica the executor serves: its workers' names in logs. Not derived from the ranks,
    # which a restarted replica takes anew after every other replica's.
    replica: int = 0


@dataclass(frozen=True)
class StageAssignment:
    """Where one worker stands: stage `rank` of a replica's `num_stages`, tensor-parallel rank
    `tp_rank` of the stage's `tp_size`. A replica's devices are numbered stage by stage
    (`device_index` = rank·tp_size + tp_rank), and so are their global ranks, from the
    executor's first on."""

    rank: int  # the stage, within its group
    num_stages: int
    layer_range: tuple[int, int]
    device: str
    world: WorkerWorld | None  # None: a device alone, linked to no other
    # Stages of a pipeline hold different layer counts, so their arenas place KV blocks at
    # different ids: the driver then speaks logical ids 0..B-1 and each stage adds its own
    # first KV block id. A single stage uses its physical ids (release/reclaim address them).
    logical_block_ids: bool
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def device_index(self) -> int:
        """This worker's device among its replica's num_stages x tp_size."""
        return self.rank * self.tp_size + self.tp_rank

    @property
    def global_rank(self) -> int:
        return self.device_index if self.world is None else self.world.first_rank + self.device_index

    @property
    def stage_ranks(self) -> list[int]:
        """The global ranks of this stage's tensor-parallel ranks (its process group)."""
        first = self.global_rank - self.tp_rank
        return list(range(first, first + self.tp_size))

    @property
    def log_name(self) -> str:
        """How this worker's log lines are prefixed."""
        replica = 0 if self.world is None else self.world.replica
        tp = f" tp {self.tp_rank}" if self.tp_size > 1 else ""
        return f"worker[replica {replica} stage {self.rank}{tp} rank {self.global_rank}]"

    @property
    def pipe(self) -> tuple[int | None, int | None]:
        """The global ranks of the same tensor-parallel rank of the previous and next stages
        (None at either end): activations go rank to rank."""
        prev_rank = self.global_rank - self.tp_size if self.rank > 0 else None
        next_rank = self.global_rank + self.tp_size if self.rank < self.num_stages - 1 else None
        return prev_rank, next_rank

    @property
    def pipe_back(self) -> int | None:
        """The global rank of the same tensor-parallel rank at the pipeline's other end, on its
        first and last stages (None elsewhere, and on a single stage): the last stage's sampled
        tokens go back to the first for micro-batches scheduled ahead of them."""
        if self.num_stages == 1 or 0 < self.rank < self.num_stages - 1:
            return None
        span = (self.num_stages - 1) * self.tp_size
        return self.global_rank + span if self.rank == 0 else self.global_rank - span
