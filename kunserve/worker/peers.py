"""A device's links to its peers: the data path of drops, restores and migrations.

Devices of one host copy straight from each other's arenas, mapped into the reader's process
once (CUDA IPC on GPUs; shared memory on CPU): the destination pulls, the source does
nothing. Devices on two hosts cannot map each other's memory: the bytes go over
torch.distributed point-to-point, both ends posting batched operations at once, in bounded
chunks.
"""

from __future__ import annotations

import hashlib
import pickle
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist

from kunserve.kernels.kv_copy import TORCH_STAGING_BYTES, copy_sub_blocks
from kunserve.worker.arena import MemoryArena

WARM_UP_ELEMS = 1024  # a row copied from a newly mapped peer arena, to set up the path


class PeerLinks:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.arenas: dict[int, torch.Tensor] = {}  # peers' arenas mapped here, by global rank

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

    def close(self) -> None:
        """Unmap the peers' memory (before the process exits)."""
        self.arenas.clear()

    def warm(self, peer: int, send: bool, dtype: torch.dtype) -> None:
        """One tiny transfer with `peer` over torch.distributed, so that the link a pipeline's
        activations take (an NCCL communicator per pair, created lazily, hundreds of ms)
        exists before a group's first step. Gloo (CPU) connects pairs fast and would only tie
        the two processes' fates together early: nothing to do there."""
        if self.device.type != "cuda":
            return
        probe = torch.zeros(1, dtype=dtype, device=self.device)
        if send:
            dist.send(probe, dst=peer)
        else:
            dist.recv(probe, src=peer)
        self.wait_for_devices()

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
            _run_p2p([dist.P2POp(dist.isend, view.index_select(0, index[chunk]), peer)])
        self.wait_for_devices()

    def recv_kv(self, view: torch.Tensor, peer: int, ids: list[int], staging_bytes: int | None) -> None:
        """Receive into rows `ids` of `view` what `peer` sends with `send_kv`."""
        index = torch.tensor(ids, dtype=torch.long, device=view.device)
        for chunk in _chunks(view, len(ids), staging_bytes or TORCH_STAGING_BYTES):
            incoming = torch.empty((chunk.stop - chunk.start, *view.shape[1:]), dtype=view.dtype, device=view.device)
            _run_p2p([dist.P2POp(dist.irecv, incoming, peer)])
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

    @staticmethod
    def swap_layers(peer: int, send: list[torch.Tensor], receive: list[torch.Tensor]) -> None:
        """Send these slots to `peer` and receive those from it, in one batch both ends post."""
        _run_p2p([dist.P2POp(dist.isend, slot, peer) for slot in send]
                 + [dist.P2POp(dist.irecv, slot, peer) for slot in receive])

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


def _run_p2p(ops: list[dist.P2POp]) -> None:
    """Post the point-to-point operations together and wait for all of them."""
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
