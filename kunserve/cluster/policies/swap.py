"""`swap` (InferCept): a replica short of KV memory preempts its youngest running request by
copying its KV to host memory and back when blocks free up; the cluster does nothing more."""

from __future__ import annotations

from kunserve.cluster.policies.base import OverloadPolicy


class SwapPolicy(OverloadPolicy):
    name = "swap"
    preemption_mode = "swap"
