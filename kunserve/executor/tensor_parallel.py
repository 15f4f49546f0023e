"""A tensor-parallel stage as one device to the control plane.

A stage of t ranks is t worker processes, but drops, restores and migrations
(kunserve/cluster/) speak to "a replica's device", as they do without tensor parallelism: its
executor sends each device call to every rank of the stage and gives back one reply. Every
rank holds the same arena layout and the same block ids, and each talks to the same rank of
its peers (Worker._peer), so most calls are the same call on every rank with the same reply.
The exceptions are here: the sampler's state lives on rank 0 alone (it samples), an arena
handle and a digest are each rank's own.
"""

from __future__ import annotations

import inspect
import pickle
from typing import Any

from kunserve.worker.protocol import DeviceCalls

# Calls only rank 0 serves: the stage's sampler is there.
SAMPLER_CALLS = frozenset({DeviceCalls.take_sampler_states.__name__, DeviceCalls.give_sampler_states.__name__})
# Calls whose replies differ by rank: each rank's arena handle, each rank's digests.
EXPORT = DeviceCalls.export_arena.__name__
DIGESTS = frozenset({DeviceCalls.kv_digests.__name__, DeviceCalls.weight_digests.__name__})
OPEN_PEER = DeviceCalls.open_peer.__name__


def call_ranks(name: str, tp_size: int) -> range:
    """The ranks of a stage that serve call `name`."""
    return range(1) if name in SAMPLER_CALLS else range(tp_size)


def rank_arguments(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], rank: int, tp_size: int
                   ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Call `name`'s arguments for rank `rank`: the same for every rank, except open_peer's
    handle (the stage's handle, combine_replies' export_arena), of which each rank maps the
    peer's same rank."""
    if name != OPEN_PEER or tp_size == 1:
        return args, kwargs
    bound = inspect.signature(DeviceCalls.open_peer).bind(None, *args, **kwargs)
    bound.arguments["handle"] = pickle.loads(bound.arguments["handle"])[rank]
    return bound.args[1:], bound.kwargs


def combine_replies(name: str, replies: list[Any]) -> Any:
    """One reply for the stage from its ranks' replies to call `name`: the ranks' arena handles
    together (one bytes value, as a device's handle is); each digest of every rank, joined;
    else the reply every rank gave (RuntimeError where they differ: the ranks are out of step)."""
    if len(replies) == 1:
        return replies[0]
    if name == EXPORT:
        return pickle.dumps(replies)
    if name in DIGESTS:
        return ["/".join(rank_digests) for rank_digests in zip(*replies, strict=True)]
    if any(reply != replies[0] for reply in replies[1:]):
        raise RuntimeError(f"{name}: the tensor-parallel ranks of a stage replied differently: {replies}")
    return replies[0]
