"""`recompute` (vLLM): a replica short of KV memory preempts its youngest running request and
recomputes it later; the cluster does nothing more."""

from __future__ import annotations

from kunserve.cluster.policies.base import OverloadPolicy


class RecomputePolicy(OverloadPolicy):
    name = "recompute"
