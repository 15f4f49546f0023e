"""Every overload policy, by name. A new policy is a module in this folder (a subclass of
base.OverloadPolicy) and one entry here."""

from __future__ import annotations

from kunserve.cluster.policies.base import OverloadPolicy
from kunserve.cluster.policies.kunserve import KunServePolicy
from kunserve.cluster.policies.kunserve_swap import KunServeSwapPolicy
from kunserve.cluster.policies.migrate import MigratePolicy
from kunserve.cluster.policies.recompute import RecomputePolicy
from kunserve.cluster.policies.swap import SwapPolicy

POLICIES: dict[str, type[OverloadPolicy]] = {
    policy.name: policy for policy in (KunServePolicy, KunServeSwapPolicy, RecomputePolicy, SwapPolicy, MigratePolicy)
}
OVERLOAD_POLICIES = tuple(POLICIES)


def policy_class(name: str) -> type[OverloadPolicy]:
    if name not in POLICIES:
        raise ValueError(f"overload_policy: expected one of {OVERLOAD_POLICIES}, got {name!r}")
    return POLICIES[name]
