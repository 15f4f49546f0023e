"""The drop mechanism on one device: a replica becomes stage r of a g-stage group, and back;
a stage of a growing group narrows to a part of its layers, and of a shrinking one widens
again (kunserve/cluster/growth.py).

Dropping keeps layers [r·L/g, (r+1)·L/g) and releases the other layers' slots in the
arena: no copy, no allocation, and their bytes are KV memory at once. The KV cache is then
seen as sub-blocks of L/g layers (block b's KV for this stage's layers is sub-block b·g + r,
in place: kunserve/layout.py), so the KV of requests that were running here stays where it
is; the sub-blocks of the other stages' layers go to the devices that now own those layers
(kunserve/worker/peers.py copies them). Restoring reclaims the slots (the control plane has
emptied their sub-blocks first) and refills the weights from the peer stage that holds them,
or from the weight source when the peer is gone. `Worker.become_stage` and
`Worker.become_replica` (kunserve/worker/worker.py) run these steps and switch the runner.
"""

from __future__ import annotations

from kunserve.layout import layers_outside_stage, stage_layers
from kunserve.model.decoder import DecoderStage
from kunserve.model.weights import WeightSource
from kunserve.worker.arena import MemoryArena
from kunserve.worker.peers import PeerLinks


def release_other_layers(arena: MemoryArena, stage: int, num_stages: int) -> list[int]:
    """Release every layer outside stage `stage`'s not released yet; returns the sub-block
    ids all released slots provide (the arena then serves as `num_stages` sub-blocks per
    block)."""
    layout = arena.layout
    layout.check_split(num_stages)
    for layer in layers_outside_stage(layout.num_layers, stage, num_stages):
        if layer not in arena.released:  # a stage narrowing (a group growing) released some before
            arena.release(layer)
    return layout.released_sub_blocks_of_stage(stage, num_stages)


def stage_model(replica: DecoderStage, arena: MemoryArena, stage: int, num_stages: int) -> DecoderStage:
    """Stage `stage`'s model: the replica's kept layers (the same arena views) over the KV
    cache seen as sub-blocks of its L/g layers."""
    keep = stage_layers(replica.spec.num_layers, stage, num_stages)
    cache = arena.stage_kv_cache(num_stages)
    return DecoderStage(
        replica.spec, keep.start, keep.stop, [arena.layers[k] for k in keep], replica.stage,
        [cache[:, k] for k in range(len(keep))], replica.cos_sin, replica.backend, replica.linear, replica.tp,
    )


def reclaim_layers(arena: MemoryArena, peers: PeerLinks, refill_from: dict[int, int]) -> None:
    """Reclaim these released layers' slots (a stage widening as its group shrinks) and refill
    each from the same slot of the global rank `refill_from` names, whose arena is mapped here."""
    for layer in sorted(refill_from):
        arena.reclaim(layer)
        peers.copy_layer_from(refill_from[layer], arena, layer)
    if refill_from:
        peers.wait_for_devices()


def refill_layers(
    arena: MemoryArena, weights: WeightSource, peers: PeerLinks, refill_from: dict[int, int] | None,
    over_network: list[int] | None,
) -> None:
    """Reclaim every released slot and refill its weights: layer k from global rank
    `refill_from[k]`, or from the weight source when None. A peer in `over_network` (a member
    of the group on another host, restoring at the same time) sends its layers over
    torch.distributed and receives this device's kept layers in return; any other peer's
    arena is mapped here and only read, so every member of a group can refill at once."""
    kept = [layer for layer in range(arena.layout.num_layers) if layer not in arena.released]
    received: dict[int, list[int]] = {peer: [] for peer in sorted(over_network or [])}
    for layer in sorted(arena.released):
        layer_weights = arena.reclaim(layer)
        if refill_from is None:
            weights.load_layer(layer, layer_weights)
        elif refill_from[layer] in received:
            received[refill_from[layer]].append(layer)
        else:
            peers.copy_layer_from(refill_from[layer], arena, layer)
    # One peer at a time, in rank order on every member, so each pair's batch meets its twin
    # (and NCCL keeps to the pair's communicator); layers go in ascending order both ways.
    for peer, layers in received.items():
        peers.swap_layers(peer, [arena.slot(layer) for layer in kept], [arena.slot(layer) for layer in layers])
    peers.wait_for_devices()
