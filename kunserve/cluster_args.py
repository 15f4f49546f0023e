"""Command-line flags of a cluster of replicas and of its coordinator (when to drop and
restore), defined once for `kunserve serve`, `bench --launch` and `simulate`."""

from __future__ import annotations

import argparse

from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.dispatcher import DISPATCH_POLICIES
from kunserve.cluster.policies.registry import OVERLOAD_POLICIES

DEFAULTS = CoordinatorConfig()
DEFAULT_DISPATCH_POLICY = "least_loaded"
OVERLOAD_POLICY_HELP = (
    "what a replica does when its KV cache overloads: kunserve drops replicated layers and fuses replicas into a "
    "pipeline group; recompute preempts and recomputes (vLLM); swap preempts to host memory (InferCept); "
    "migrate moves running requests to lighter replicas (Llumnix)"
)


def add_cluster_arguments(parser: argparse.ArgumentParser, default_replicas: int) -> None:
    """--replicas (vLLM's --data-parallel-size), the dispatch and overload policies, and the
    coordinator's timings."""
    parser.add_argument("--replicas", "--data-parallel-size", "-dp", dest="replicas", type=int,
                        default=default_replicas,
                        help="data-parallel replicas, each on its own device (or --pipeline-parallel-size devices)")
    parser.add_argument("--dispatch-policy", choices=DISPATCH_POLICIES, default=DEFAULT_DISPATCH_POLICY,
                        help="least_loaded: to the replica with the least KV demand; round_robin: in turn")
    parser.add_argument("--overload-policy", choices=OVERLOAD_POLICIES, default=DEFAULTS.overload_policy,
                        help=OVERLOAD_POLICY_HELP)
    parser.add_argument("--max-group-size", type=int, default=DEFAULTS.max_group_size,
                        help="most replicas a drop fuses into one pipeline group (default: as many as needed)")
    parser.add_argument("--drop-after-s", type=float, default=DEFAULTS.drop_after_s,
                        help="kunserve: requests waiting for memory (KV blocks or sequence slots) this long trigger a drop "
                             "(or a group's growth); migrate: queued demand beyond the free blocks")
    parser.add_argument("--restore-after-s", type=float, default=DEFAULTS.restore_after_s,
                        help="kunserve: forecast demand fitting half the group's replicas this long triggers a restore "
                             "(doubled per drop-restore-drop cycle; also for a group formed by POST /v1/cluster/drop)")
    parser.add_argument("--min-drop-gain", type=float, default=DEFAULTS.min_drop_gain,
                        help="kunserve: a drop is made only when the group's predicted decode throughput, with the "
                             "queue it admits, is at least this share of its members' as replicas")
    parser.add_argument("--check-interval-s", type=float, default=DEFAULTS.check_interval_s,
                        help="how often the coordinator looks at the replicas")
    parser.add_argument("--overlap-exchange", action=argparse.BooleanOptionalAction,
                        default=DEFAULTS.overlap_exchange,
                        help="a drop's group starts at once and moves the running requests' KV in layer-sized "
                             "chunks between its steps, each running request waiting for its own KV (default: off, "
                             "the exchange completes inside the drop)")


def coordinator_config(args: argparse.Namespace, overload_policy: str | None = None) -> CoordinatorConfig:
    """The coordinator's settings from the flags; `overload_policy` replaces --overload-policy
    (a comparison runs each policy in turn)."""
    return CoordinatorConfig(
        overload_policy=overload_policy or args.overload_policy,
        max_group_size=args.max_group_size,
        check_interval_s=args.check_interval_s,
        drop_after_s=args.drop_after_s,
        restore_after_s=args.restore_after_s,
        min_drop_gain=args.min_drop_gain,
        overlap_exchange=args.overlap_exchange,
    )
