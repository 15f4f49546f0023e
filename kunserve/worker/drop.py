"""The drop mechanism on one device: a replica becomes stage r of a g-stage group and back.

Dropping keeps layers [r·L/g, (r+1)·L/g) and releases the other layers' slots in the
arena: no copy, no allocation, and their bytes are KV memory at once. The KV cache is then
seen as sub-blocks of L/g layers (block b's KV for this stage's layers is sub-block b·g + r,
in place), so the KV of requests that were running here stays where it is; the sub-blocks of
the other stages' layers go to the devices that now own those layers: each device maps
its peers' arenas once before the first drop (CUDA IPC; shared memory on CPU) and pulls what it needs
(`pull_kv`), every device at once. Restoring reclaims the slots (the control plane has emptied their
sub-blocks first) and refills the weights from the peer stage that holds them, or from the
weight source when the peer is gone. A peer on another host cannot be mapped: KV and weights
then go over torch.distributed point-to-point (`send_kv` / `recv_kv`, and `become_replica`'s
`over_network`), in batched operations both ends post at once.
"""

from __future__ import annotations

import hashlib
import pickle
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist

from kunserve.kernels.kv_copy import TORCH_STAGING_BYTES, copy_sub_blocks
from kunserve.layout import layers_outside_stage, stage_layers
from kunserve.model.decoder import DecoderStage
from kunserve.worker.model_runner import ModelRunner
from kunserve.worker.worker import Worker

WARM_UP_ELEMS = 1024  # a row copied from a newly mapped peer arena, to set up the path


def become_stage(
    worker: Worker, stage: int, num_stages: int, prev_rank: int | None = None, next_rank: int | None = None
) -> list[int]:
    """Keep stage `stage`'s layers, release the others; activations then come from global rank
    `prev_rank` and go to `next_rank`. Returns the sub-block ids the released slots provide."""
    if worker.group is not None:
        raise RuntimeError(f"already stage {worker.group[0]} of a {worker.group[1]}-stage group")
    layout, spec = worker.layout, worker.spec
    if layout.num_layers != spec.num_layers:
        raise RuntimeError("only a device holding the whole model (a replica) can drop layers")
    layout.check_split(num_stages)
    keep = stage_layers(spec.num_layers, stage, num_stages)
    for layer in layers_outside_stage(spec.num_layers, stage, num_stages):
        worker.arena.release(layer)
    released = layout.released_sub_blocks_of_stage(stage, num_stages)
    if (stage, num_stages) not in worker.stage_runners:
        cache = worker.arena.stage_kv_cache(num_stages)
        replica = worker.replica_model
        model = DecoderStage(
            spec, keep.start, keep.stop, [worker.arena.layers[k] for k in keep], replica.stage,
            [cache[:, k] for k in range(len(keep))], replica.cos_sin, replica.backend, replica.linear,
        )
        worker.stage_runners[(stage, num_stages)] = (model, ModelRunner(model, worker.device,
                                                                        worker.decode_graphs(model, lazy=True)))
    worker.model, worker.runner = worker.stage_runners[(stage, num_stages)]
    worker.runner.sampler = worker.replica_runner.sampler  # seeded requests keep their generators
    worker.group = (stage, num_stages)
    worker.pipe_prev, worker.pipe_next = prev_rank, next_rank
    return released


def become_replica(worker: Worker, refill_from: dict[int, int] | None, over_network: list[int] | None = None) -> None:
    """Reclaim the released slots and refill their weights: layer k from global rank
    `refill_from[k]`, or all from the weight source when None. A peer in `over_network` (a
    member of the group on another host, restoring at the same time) sends its layers over
    torch.distributed and receives this stage's layers in return; any other peer's arena is
    opened here (`open_peer`) and only read, so every member of a group can refill at once."""
    if worker.group is None:
        raise RuntimeError("not a stage of a group")
    kept = [layer for layer in range(worker.layout.num_layers) if layer not in worker.arena.released]
    received: dict[int, list[int]] = {peer: [] for peer in sorted(over_network or [])}
    for layer in sorted(worker.arena.released):
        weights = worker.arena.reclaim(layer)
        if refill_from is None:
            worker.weights.load_layer(layer, weights)
        elif refill_from[layer] in received:
            received[refill_from[layer]].append(layer)
        else:
            peer = _peer_arena(worker, refill_from[layer])
            start = worker.layout.slot_start_elem(layer)
            worker.arena.slot(layer).copy_(peer[start : start + worker.layout.layer_elems], non_blocking=True)
    # One peer at a time, in rank order on every member, so each pair's batch meets its twin
    # (and NCCL keeps to the pair's communicator); layers go in ascending order both ways.
    for peer, layers in received.items():
        _run_p2p([dist.P2POp(dist.isend, worker.arena.slot(layer), peer) for layer in kept]
                 + [dist.P2POp(dist.irecv, worker.arena.slot(layer), peer) for layer in layers])
    _wait_for_device(worker)
    worker.model, worker.runner = worker.replica_model, worker.replica_runner
    worker.group = None
    worker.pipe_prev = worker.pipe_next = None


def export_arena(worker: Worker) -> bytes:
    """A handle to this device's arena that another worker process can map (CUDA IPC on a
    GPU; shared memory on CPU, where the buffer moves into shared memory the first time)."""
    buffer = worker.arena.buffer
    if buffer.device.type == "cpu" and not buffer.is_shared():
        buffer.share_memory_()  # in place: every view of the arena follows
    return bytes(ForkingPickler.dumps(buffer))


def open_peer(worker: Worker, peer: int, handle: bytes) -> None:
    """Map global rank `peer`'s arena (from its `export_arena`) for direct copies, and copy
    one row from it: the first copy from a peer GPU creates this process's context there,
    loads the gather kernel and enables peer access (~0.2 s), which the first exchange
    would otherwise pay while requests wait."""
    arena = pickle.loads(handle)
    worker.peer_arenas[peer] = arena
    first = torch.zeros(1, dtype=torch.long)
    row = torch.empty(1, WARM_UP_ELEMS, dtype=arena.dtype, device=worker.device)
    copy_sub_blocks(arena[:WARM_UP_ELEMS].view(1, -1), first, row, first)
    _wait_for_device(worker)


def warm_link(worker: Worker, peer: int, send: bool) -> None:
    """One tiny transfer with global rank `peer` over torch.distributed, so that the link a
    pipeline's activations take (an NCCL communicator per pair, created lazily, hundreds of
    ms) exists before the first step of a group needs it. Gloo (CPU) connects pairs fast
    and would only tie the two processes' fates together early: nothing to do there."""
    if worker.device.type != "cuda":
        return
    probe = torch.zeros(1, dtype=worker.arena.buffer.dtype, device=worker.device)
    if send:
        dist.send(probe, dst=peer)
    else:
        dist.recv(probe, src=peer)
    _wait_for_device(worker)


def _peer_arena(worker: Worker, peer: int) -> torch.Tensor:
    if peer not in worker.peer_arenas:
        raise RuntimeError(f"the arena of worker {peer} is not open here (open_peer)")
    return worker.peer_arenas[peer]


def _wait_for_device(worker: Worker) -> None:
    """Copies return to the host before the bytes have moved: wait for every device this
    process touched, so the reply to the driver means done (and timings mean what they say)."""
    if worker.device.type == "cuda":
        for device in {worker.device, *(t.device for t in worker.peer_arenas.values())}:
            torch.cuda.synchronize(device)


def take_sampler_states(worker: Worker, request_ids: list[str]) -> dict[str, torch.Tensor]:
    """Seeded requests' random-stream states, moving with them to the device that samples."""
    return worker.replica_runner.sampler.take_states(request_ids)


def give_sampler_states(worker: Worker, states: dict[str, torch.Tensor]) -> None:
    worker.replica_runner.sampler.give_states(states)


def kv_view(worker: Worker) -> torch.Tensor:
    """The KV cache as this device addresses it now: blocks, or a stage's sub-blocks."""
    if worker.group is None:
        return worker.arena.kv_cache
    return worker.arena.stage_kv_cache(worker.group[1])


def pull_kv(
    worker: Worker, peer: int, src_ids: list[int], dst_ids: list[int], staging_bytes: int = TORCH_STAGING_BYTES
) -> None:
    """Copy the KV of (sub-)blocks `src_ids` of global rank `peer`'s arena (seen as this
    device sees its own now) into `dst_ids` here, at most `staging_bytes` at a time
    (kunserve/kernels/kv_copy.py)."""
    view = kv_view(worker)
    peer_view = _peer_arena(worker, peer).view(view.shape)
    copy_sub_blocks(peer_view, torch.tensor(src_ids), view, torch.tensor(dst_ids), staging_bytes=staging_bytes)
    _wait_for_device(worker)


def send_kv(worker: Worker, peer: int, ids: list[int], staging_bytes: int = TORCH_STAGING_BYTES) -> None:
    """Send the KV of (sub-)blocks `ids` to global rank `peer`, on another host, which runs
    `recv_kv` at the same time; at most `staging_bytes` gathered at a time."""
    view = kv_view(worker)
    index = torch.tensor(ids, dtype=torch.long, device=view.device)
    for chunk in _chunks(view, len(ids), staging_bytes):
        _run_p2p([dist.P2POp(dist.isend, view.index_select(0, index[chunk]), peer)])
    _wait_for_device(worker)


def recv_kv(worker: Worker, peer: int, ids: list[int], staging_bytes: int = TORCH_STAGING_BYTES) -> None:
    """Receive into (sub-)blocks `ids` the KV that global rank `peer` sends with `send_kv`
    (its ids in the same order; both ends must agree on `staging_bytes`)."""
    view = kv_view(worker)
    index = torch.tensor(ids, dtype=torch.long, device=view.device)
    for chunk in _chunks(view, len(ids), staging_bytes):
        incoming = torch.empty((chunk.stop - chunk.start, *view.shape[1:]), dtype=view.dtype, device=view.device)
        _run_p2p([dist.P2POp(dist.irecv, incoming, peer)])
        view.index_copy_(0, index[chunk], incoming)
    _wait_for_device(worker)


def _chunks(view: torch.Tensor, count: int, staging_bytes: int) -> list[slice]:
    """`count` rows of `view` in runs of at most `staging_bytes` (at least one row each)."""
    per_chunk = max(1, staging_bytes // (view[0].numel() * view.element_size()))
    return [slice(start, min(start + per_chunk, count)) for start in range(0, count, per_chunk)]


def _run_p2p(ops: list[dist.P2POp]) -> None:
    """Post the point-to-point operations together and wait for all of them."""
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()


def move_kv(worker: Worker, src_ids: list[int], dst_ids: list[int]) -> None:
    """Copy the KV of (sub-)blocks `src_ids` into `dst_ids` on this device (they must not
    overlap: the copy runs in place)."""
    view = kv_view(worker)
    copy_sub_blocks(view, torch.tensor(src_ids), view, torch.tensor(dst_ids))
    _wait_for_device(worker)


def kv_digests(worker: Worker, ids: list[int]) -> list[str]:
    """A digest of each (sub-)block's bytes, to check transfers bit for bit."""
    view = kv_view(worker)
    return [_digest(view[i]) for i in ids]


def weight_digests(worker: Worker) -> list[str]:
    """A digest of each layer slot's bytes (the weights, when the layer is held)."""
    return [_digest(worker.arena.slot(layer)) for layer in range(worker.layout.num_layers)]


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
