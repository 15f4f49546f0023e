"""`kunserve-swap`: kunserve's drops, grown groups and restores, over engines that preempt by
swapping to host memory (as `swap`, InferCept) rather than by recompute. A replica short of
KV swaps until its drop is due; a group that can grow no further swaps its stages' KV to their
hosts' memory (each stage its own layers' part); at a transition, requests swapped out wait to
be recomputed by the engine that takes them (kunserve/engine/scheduler.py release_all).
Swapping pays where the host link is free and the swapped requests are long: kunserve
(recompute) is the choice where host links are shared or contexts are short."""

from __future__ import annotations

from kunserve.cluster.policies.kunserve import KunServePolicy


class KunServeSwapPolicy(KunServePolicy):
    name = "kunserve-swap"
    preemption_mode = "swap"
