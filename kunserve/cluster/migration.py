"""Live migration of a running request from one replica to another (the `migrate` overload
policy, after Llumnix): the KV-centric answer to an overloaded replica, which moves load to
a lighter one instead of making memory.

The copy runs in stages while the request keeps decoding at its source. Stage one copies
the blocks that are already full (their KV never changes again) while only the destination
pauses between two of its steps. The last stage pauses both engines between steps, copies
the blocks filled since and the partly filled last one, and moves the request (its
sampler's random stream too) to the destination's scheduler: the request stalls for this
stage only. The destination pulls the KV straight from the source's arena (mapped into its
process, as for a drop: kunserve/worker/drop.py); from another host the source sends it over
the network (kunserve/cluster/links.py), so then stage one pauses the source too. If the
request finished, was preempted or aborted meanwhile, the migration is called off and the
destination's blocks freed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kunserve.cluster.links import post_kv_copy, replica_device, share_host
from kunserve.cluster.view import ClusterView
from kunserve.engine.llm_engine import LLMEngine
from kunserve.engine.sequence import Sequence, SequenceStatus
from kunserve.executor.base import WorkerExecutor
from kunserve.worker.protocol import DeviceCalls

logger = logging.getLogger(__name__)


@dataclass
class MigrationStats:
    request_id: str
    duration_s: float  # first copy to the request running at its destination
    pause_s: float  # the last stage: the request neither decodes at its source nor at its destination
    blocks_moved: int


def migrate(cluster: ClusterView, seq: Sequence, src: int, dst: int) -> MigrationStats | None:
    """Move running `seq` from replica `src` to replica `dst` (both in replica mode, their
    engine loops running); None when it was called off."""
    clock = cluster.engines[src].clock
    start = clock()
    source, target = cluster.engines[src], cluster.engines[dst]
    src_loop, dst_loop = cluster.replicas[src], cluster.replicas[dst]
    src_device, dst_device = replica_device(source.executor, "migrate"), replica_device(target.executor, "migrate")
    both = [cluster.replicas[i] for i in sorted((src, dst))]  # one order: no deadlock
    # A send is a call on the source's device, which its running loop must not interleave with steps.
    early_pauses = [dst_loop] if share_host(src_device, dst_device) else both
    preemptions = seq.metrics.num_preemptions
    full = seq.num_computed_tokens // source.config.block_size
    early = list(seq.block_ids[:full])  # read while the source runs: full blocks do not change
    for loop in early_pauses:
        loop.pause()
    try:
        if len(early) > target.block_manager.num_free_blocks:
            return None
        reserved = target.block_manager.take(len(early))
        if early:
            _copy_kv_or_give_back(src_device, dst_device, early, reserved, target)
    finally:
        for loop in early_pauses:
            loop.resume()
    pause_start = clock()
    for loop in both:
        loop.pause()
    try:
        still_here = (seq.status is SequenceStatus.RUNNING and seq.metrics.num_preemptions == preemptions
                      and seq.block_ids[:full] == early and not seq.in_flight)
        late = list(seq.block_ids[full:])
        if not still_here or len(late) > target.block_manager.num_free_blocks:
            target.block_manager.give(reserved)
            return None
        rest = target.block_manager.take(len(late))
        if late:
            _copy_kv_or_give_back(src_device, dst_device, late, rest, target, reserved)
        _move_sampler_state(source, target, seq.request_id)
        source.release_running(seq)
        seq.block_ids = reserved + rest
        target.adopt_running(source, seq)
    finally:
        for loop in (src_loop, dst_loop):
            loop.resume()
    end = clock()
    return MigrationStats(seq.request_id, end - start, end - pause_start, len(early) + len(late))


def _copy_kv_or_give_back(source: WorkerExecutor, target: WorkerExecutor, src_ids: list[int], dst_ids: list[int],
                          engine: LLMEngine, reserved_before: list[int] | None = None) -> None:
    """Copy the KV into the destination's blocks `dst_ids`; if a device fails meanwhile, the
    destination gets those blocks (and `reserved_before`) back before the error goes on."""
    try:
        for pending in post_kv_copy(source, target, src_ids, dst_ids):
            pending.wait()
    except BaseException:
        engine.block_manager.give(dst_ids + (reserved_before or []))
        raise


def _move_sampler_state(source: LLMEngine, target: LLMEngine, request_id: str) -> None:
    """A seeded request keeps its random stream on its new device."""
    states = replica_device(source.executor, "migrate").call(0, DeviceCalls.take_sampler_states, [request_id])
    if states:
        replica_device(target.executor, "migrate").call(0, DeviceCalls.give_sampler_states, states)
