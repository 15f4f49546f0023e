"""`kunserve-swap`: kunserve's drops, grown groups and restores, over engines that always preempt
by swapping to host memory while it has room (as `swap`, InferCept), where `kunserve` chooses
per request between swap and recompute by their cost (preemption_mode "auto"): the operator's
explicit choice of swapping. A replica short of KV swaps until its drop is due; a group that
can grow no further swaps its stages' KV to their hosts' memory (each stage its own layers'
part); at a transition, requests swapped out wait to be recomputed by the engine that takes
them (kunserve/engine/scheduler.py release_all)."""

from __future__ import annotations

from kunserve.cluster.policies.kunserve import KunServePolicy


class KunServeSwapPolicy(KunServePolicy):
    name = "kunserve-swap"
    preemption_mode = "swap"
