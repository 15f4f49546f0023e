"""A device's links to its peers: the data path of pipelines, drops, restores and migrations.

Devices of one host copy straight from each other's arenas, mapped into the reader's process
once (CUDA IPC on GPUs; shared memory on CPU): the destination pulls, the source does
nothing. Tensors that flow between two devices (a pipeline's activations; KV and weights
between hosts, which cannot map each other's memory) go over the pair's own link: a
two-member torch.distributed backend (gloo on CPU, NCCL on GPU) that both ends open at once
through the driver's rendezvous store (kunserve/executor/rendezvous.py), with a timeout. No
worker belongs to a world of all of them: a peer that dies fails only the operations on its
links (at once where its connection drops, else at the timeout), and a restarted peer, under
a new global rank, links afresh.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler
from typing import Protocol, cast

import torch
import torch.distributed as dist

from kunserve.kernels.kv_copy import TORCH_STAGING_BYTES, copy_sub_blocks
from kunserve.worker.arena import MemoryArena
from kunserve.worker.protocol import WorkerWorld

WARM_UP_ELEMS = 1024  # a row copied from a newly mapped peer arena, to set up the path
TAG = 0  # every transfer of a link: messages between its two ends match in the order posted


class LinkBackend(Protocol):
    """What a link uses of a torch.distributed backend (gloo's or NCCL's)."""

    def send(self, tensors: list[torch.Tensor], dst_rank: int, tag: int) -> dist.Work: ...

    def recv(self, tensors: list[torch.Tensor], src_rank: int, tag: int) -> dist.Work: ...

    def abort(self) -> None: ...


@dataclass
class Link:
    """A two-member torch.distributed backend shared with one peer."""

    group: LinkBackend
    peer_index: int  # the peer's member index in it (the lower global rank is member 0)


class PeerLinks:
    def __init__(self, device: torch.device, world: WorkerWorld | None = None, rank: int = 0) -> None:
        """`world`: where to meet peers (None: a device alone, which links to nobody); `rank`:
        this worker's global rank."""
        self.device = device
        self.world = world
        self.rank = rank
        self.arenas: dict[int, torch.Tensor] = {}  # peers' arenas mapped here, by global rank
        self.links: dict[int, Link] = {}  # by the peer's global rank
        self._opened: Counter[int] = Counter()  # links opened with each peer: names the next one
        self._store: dist.Store | None = None  # the rendezvous store, connected at the first link

    # ---- mapping peers' arenas ------------------------------------------------------------

    @staticmethod
    def export(arena: MemoryArena) -> bytes:
        """A handle to `arena` that another worker process can map (CUDA IPC on a GPU; shared
        memory on CPU, where the buffer moves into shared memory the first time)."""
        buffer = arena.buffer
        if buffer.device.type == "cpu" and not buffer.is_shared():
            buffer.share_memory_()  # in place: every view of the arena follows
        return bytes(ForkingPickler.dumps(buffer))

    def open(self, peer: int, handle: bytes) -> None:
        """Map global rank `peer`'s arena and copy one row from it: the first copy from a peer
        GPU creates this process's context there, loads the gather kernel and enables peer
        access (~0.2 s), which the first exchange would otherwise pay while requests wait."""
        arena = pickle.loads(handle)
        self.arenas[peer] = arena
        first = torch.zeros(1, dtype=torch.long)
        row = torch.empty(1, WARM_UP_ELEMS, dtype=arena.dtype, device=self.device)
        copy_sub_blocks(arena[:WARM_UP_ELEMS].view(1, -1), first, row, first)
        self.wait_for_devices()

    def close_peer(self, peer: int) -> None:
        """Unmap `peer`'s arena and close the link to it (it died, or its replica restarts)."""
        self.arenas.pop(peer, None)
        self._close_link(peer)

    def close(self) -> None:
        """Unmap the peers' memory and close every link (before the process exits)."""
        for peer in {*self.arenas, *self.links}:
            self.close_peer(peer)

    # ---- links -----------------------------------------------------------------------------

    def connect(self, peer: int) -> None:
        """Open the link with global rank `peer`, which opens it at the same time (each end
        waits for the other up to the world's link timeout)."""
        self._close_link(peer)
        low, high = sorted((self.rank, peer))
        # Both ends count their links to each other alike: the n-th of a pair meets under its own name.
        name = f"link/{low}-{high}/{self._opened[peer]}"
        self._opened[peer] += 1
        index = 0 if self.rank == low else 1
        group = self.open_group(name, index, 2)
        self.links[peer] = Link(cast(LinkBackend, group), 1 - index)

    def open_group(self, name: str, index: int, size: int) -> object:
        """A torch.distributed backend of `size` members (gloo on CPU, NCCL on GPU), this worker
        its member `index`, which the others open at the same time under the same `name` at the
        rendezvous store (each waits for the rest up to the world's link timeout, and so does
        every later operation on it): a pair's link, or a tensor-parallel stage's group
        (kunserve/worker/parallel.py). A name is never used twice: global ranks are not reused."""
        if self.world is None:
            raise RuntimeError(f"a worker without a rendezvous cannot open group {name!r}")
        store = dist.PrefixStore(name, self._rendezvous_store())
        timeout = timedelta(seconds=self.world.link_timeout_s)
        if self.device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()  # only CUDA builds of torch have NCCL
            options._timeout = timeout
            return dist.ProcessGroupNCCL(store, index, size, options)
        return dist.ProcessGroupGloo(store, index, size, timeout)

    def warm(self, peer: int, send: bool, dtype: torch.dtype) -> None:
        """Open the link with `peer` and, on GPUs, make one tiny transfer over it: NCCL creates a
        pair's communicator at its first transfer (hundreds of ms), which a group's first step
        would otherwise wait for. Gloo connects as the link opens."""
        self.connect(peer)
        if self.device.type != "cuda":
            return
        probe = torch.zeros(1, dtype=dtype, device=self.device)
        if send:
            self.send(probe, peer)
        else:
            self.recv(probe, peer)
        self.wait_for_devices()

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        """Send `tensor` to `peer`, which receives it with `recv`."""
        self.transfer(peer, [tensor], [])

    def recv(self, tensor: torch.Tensor, peer: int) -> None:
        """Receive into `tensor` what `peer` sends."""
        self.transfer(peer, [], [tensor])

    def transfer(self, peer: int, send: list[torch.Tensor], receive: list[torch.Tensor]) -> None:
        """Send these tensors to `peer` and receive those from it, while it does the converse.
        The lower global rank posts its sends first and the higher its receives, so the two
        ends' operations pair up in order even where a link runs them one at a time (NCCL)."""
        link = self._link(peer)
        sends = [(link.group.send, tensor) for tensor in send]
        receives = [(link.group.recv, tensor) for tensor in receive]
        ordered = sends + receives if self.rank < peer else receives + sends
        posted = [post([tensor], link.peer_index, TAG) for post, tensor in ordered]
        for work in posted:
            work.wait()

    def _close_link(self, peer: int) -> None:
        link = self.links.pop(peer, None)
        if link is not None:
            link.group.abort()  # waits for nothing: the peer may be gone

    def _link(self, peer: int) -> Link:
        if peer not in self.links:
            raise RuntimeError(f"no link to worker {peer} is open here (warm_link)")
        return self.links[peer]

    def _rendezvous_store(self) -> dist.Store:
        assert self.world is not None
        if self._store is None:
            host, port = self.world.store_address.rsplit(":", 1)
            self._store = dist.TCPStore(host, int(port), is_master=False,
                                        timeout=timedelta(seconds=self.world.link_timeout_s))
        return self._store

    # ---- KV --------------------------------------------------------------------------------

    def pull_kv(self, view: torch.Tensor, peer: int, src_ids: list[int], dst_ids: list[int],
                staging_bytes: int | None) -> None:
        """Copy rows `src_ids` of `peer`'s arena (seen with `view`'s shape) into rows `dst_ids`
        of `view`, at most `staging_bytes` at a time (kunserve/kernels/kv_copy.py)."""
        peer_view = self._arena(peer).view(view.shape)
        copy_sub_blocks(peer_view, torch.tensor(src_ids), view, torch.tensor(dst_ids),
                        staging_bytes=staging_bytes or TORCH_STAGING_BYTES)
        self.wait_for_devices()

    def send_kv(self, view: torch.Tensor, peer: int, ids: list[int], staging_bytes: int | None) -> None:
        """Send rows `ids` of `view` to `peer` (which runs `recv_kv` with the same staging)."""
        index = torch.tensor(ids, dtype=torch.long, device=view.device)
        for chunk in _chunks(view, len(ids), staging_bytes or TORCH_STAGING_BYTES):
            self.send(view.index_select(0, index[chunk]), peer)
        self.wait_for_devices()

    def recv_kv(self, view: torch.Tensor, peer: int, ids: list[int], staging_bytes: int | None) -> None:
        """Receive into rows `ids` of `view` what `peer` sends with `send_kv`."""
        index = torch.tensor(ids, dtype=torch.long, device=view.device)
        for chunk in _chunks(view, len(ids), staging_bytes or TORCH_STAGING_BYTES):
            incoming = torch.empty((chunk.stop - chunk.start, *view.shape[1:]), dtype=view.dtype, device=view.device)
            self.recv(incoming, peer)
            view.index_copy_(0, index[chunk], incoming)
        self.wait_for_devices()

    def move_kv(self, view: torch.Tensor, src_ids: list[int], dst_ids: list[int]) -> None:
        """Copy rows `src_ids` of `view` into `dst_ids` (they must not overlap)."""
        copy_sub_blocks(view, torch.tensor(src_ids), view, torch.tensor(dst_ids))
        self.wait_for_devices()

    # ---- weights ---------------------------------------------------------------------------

    def copy_layer_from(self, peer: int, arena: MemoryArena, layer: int) -> None:
        """Refill layer `layer`'s slot from the same slot of `peer`'s mapped arena."""
        start = arena.layout.slot_start_elem(layer)
        source = self._arena(peer)[start : start + arena.layout.layer_elems]
        arena.slot(layer).copy_(source, non_blocking=True)

    def swap_layers(self, peer: int, send: list[torch.Tensor], receive: list[torch.Tensor]) -> None:
        """Send these slots to `peer` and receive those from it, while it does the converse."""
        self.transfer(peer, send, receive)

    def wait_for_devices(self) -> None:
        """Copies return to the host before the bytes have moved: wait for every device this
        process touched, so the reply to the driver means done (and timings mean what they say)."""
        if self.device.type == "cuda":
            for device in {self.device, *(t.device for t in self.arenas.values())}:
                torch.cuda.synchronize(device)

    def _arena(self, peer: int) -> torch.Tensor:
        if peer not in self.arenas:
            raise RuntimeError(f"the arena of worker {peer} is not open here (open_peer)")
        return self.arenas[peer]


def digest(tensor: torch.Tensor) -> str:
    """A digest of a tensor's bytes, to check copies bit for bit."""
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def _chunks(view: torch.Tensor, count: int, staging_bytes: int) -> list[slice]:
    """`count` rows of `view` in runs of at most `staging_bytes` (at least one row each)."""
    per_chunk = max(1, staging_bytes // (view[0].numel() * view.element_size()))
    return [slice(start, min(start + per_chunk, count)) for start in range(0, count, per_chunk)]

