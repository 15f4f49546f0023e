"""The drop mechanism on one device: a replica becomes stage r of a g-stage group and back.

Dropping keeps layers [r·L/g, (r+1)·L/g) and releases the other layers' slots in the
arena: no copy, no allocation, and their bytes are KV memory at once. The KV cache is then
seen as sub-blocks of L/g layers (block b's KV for this stage's layers is sub-block b·g + r,
in place), so the KV of requests that were running here stays where it is; the sub-blocks of
the other stages' layers go to the devices that now own those layers (`exchange_kv`,
batched point-to-point, both directions at once). Restoring reclaims the slots (the control plane has emptied their
sub-blocks first) and refills the weights from the peer stage that holds them, or from the
weight source when the peer is gone.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from kunserve.model.decoder import DecoderStage
from kunserve.worker.model_runner import ModelRunner
from kunserve.worker.worker import Worker

# Bytes of KV staged per transfer message each way during an exchange: large enough to run
# at link speed, small enough to fit beside a full KV cache.
KV_EXCHANGE_CHUNK_BYTES = 256 << 20


def stage_layers(num_layers: int, stage: int, num_stages: int) -> range:
    per_stage = num_layers // num_stages
    return range(stage * per_stage, (stage + 1) * per_stage)


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
    released: list[int] = []
    for layer in range(spec.num_layers):
        if layer not in keep:
            worker.arena.release(layer)
            released.extend(layout.released_sub_blocks(layer, num_stages))
    cache = worker.arena.stage_kv_cache(num_stages)
    replica = worker.replica_model
    worker.model = DecoderStage(
        spec, keep.start, keep.stop, [worker.arena.layers[k] for k in keep], replica.stage,
        [cache[:, k] for k in range(len(keep))], replica.cos_sin, replica.backend,
    )
    # Eager for now: a stage's decode graphs would have to be captured at every drop.
    worker.runner = ModelRunner(worker.model, worker.device)
    worker.runner.sampler = worker.replica_runner.sampler  # seeded requests keep their generators
    worker.group = (stage, num_stages)
    worker.pipe_prev, worker.pipe_next = prev_rank, next_rank
    return released


def become_replica(worker: Worker, refill_from: dict[int, int] | None) -> None:
    """Reclaim the released slots and refill their weights: layer k received from global rank
    `refill_from[k]` (which runs `send_layers`), or all from the weight source when None."""
    if worker.group is None:
        raise RuntimeError("not a stage of a group")
    for layer in sorted(worker.arena.released):
        weights = worker.arena.reclaim(layer)
        if refill_from is None:
            worker.weights.load_layer(layer, weights)
        else:
            dist.recv(worker.arena.slot(layer), src=refill_from[layer])
    _wait_for_device(worker)
    worker.model, worker.runner = worker.replica_model, worker.replica_runner
    worker.group = None
    worker.pipe_prev = worker.pipe_next = None


def send_layers(worker: Worker, layers: list[int], dst: int) -> None:
    """Send whole layer slots (weights) to global rank `dst`, in ascending layer order."""
    for layer in sorted(layers):
        dist.send(worker.arena.slot(layer), dst=dst)
    _wait_for_device(worker)


def warm_link(worker: Worker, peer: int, send: bool) -> None:
    """One tiny transfer with global rank `peer`, so that the link (an NCCL communicator for
    the pair, created lazily) exists before a drop needs it."""
    probe = torch.zeros(1, dtype=worker.arena.buffer.dtype, device=worker.device)
    if send:
        dist.send(probe, dst=peer)
    else:
        dist.recv(probe, src=peer)
    _wait_for_device(worker)


def _wait_for_device(worker: Worker) -> None:
    """NCCL transfers return to the host before the bytes have moved: wait for them, so the
    reply to the driver means done (and transition timings mean what they say)."""
    if worker.device.type == "cuda":
        torch.cuda.synchronize(worker.device)


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


def exchange_kv(
    worker: Worker, send_ids: list[int], recv_ids: list[int], peer: int, chunk_bytes: int = KV_EXCHANGE_CHUNK_BYTES
) -> None:
    """Both directions with global rank `peer` at once (the peer calls it with the lists
    swapped): send the KV of `send_ids`, receive into `recv_ids`. In chunks of at most
    `chunk_bytes` each way (both sides must agree), so the staging memory stays small."""
    view = kv_view(worker)
    per_chunk = max(1, chunk_bytes // (view[0].numel() * view.element_size()))
    for start in range(0, max(len(send_ids), len(recv_ids)), per_chunk):
        sending, receiving = send_ids[start : start + per_chunk], recv_ids[start : start + per_chunk]
        ops = []
        if sending:
            outgoing = view.index_select(0, torch.tensor(sending, device=view.device))
            ops.append(dist.P2POp(dist.isend, outgoing, peer))
        if receiving:
            incoming = torch.empty((len(receiving), *view.shape[1:]), dtype=view.dtype, device=view.device)
            ops.append(dist.P2POp(dist.irecv, incoming, peer))
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        if receiving:
            view.index_copy_(0, torch.tensor(receiving, device=view.device), incoming)
    _wait_for_device(worker)


def move_kv(worker: Worker, src_ids: list[int], dst_ids: list[int]) -> None:
    """Copy the KV of (sub-)blocks `src_ids` into `dst_ids` on this device."""
    view = kv_view(worker)
    index = torch.tensor(src_ids, device=view.device)
    view.index_copy_(0, torch.tensor(dst_ids, device=view.device), view.index_select(0, index))
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
