"""`kunserve bench --demo`: the headline experiment in about a minute on two CPU cores.

The embedded tiny model on two replicas (one single-threaded CPU worker process each), each
with a KV cache of a few blocks, takes bursts of gamma arrivals (high cv) that overload both:
`recompute` preempts and queues, `kunserve` drops half of each replica's layers, fuses the two
into a pipeline and restores when a burst has passed. The demo sets the model, the cluster,
the workload and the engine settings below; other flags (--out-dir, --seed, --no-progress,
other engine flags) still apply.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass

from kunserve.bench.compare import DROP, KUNSERVE_POLICY, RESTORE
from kunserve.bench.launch import run_launch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    policies: tuple[str, ...] = ("recompute", "kunserve")
    replicas: int = 2
    dispatch_policy: str = "round_robin"
    # Engine: the embedded tiny Llama; 8 blocks of 16 tokens hold one of the requests below (6 blocks).
    model: str | None = None
    skip_tokenizer_init: bool = True  # token-id prompts; no text is looked at
    worker_threads: int = 1
    num_kv_blocks: int = 8
    max_num_seqs: int = 16
    # Several prompts per step: a group (one engine) then prefills as fast as its replicas did.
    max_num_batched_tokens: int = 512
    # Workload: bursts far above what two replicas' KV holds, calm in between.
    num_prompts: int = 64
    request_rate: float = 8.0
    arrival: str = "gamma"
    cv: float = 4.0
    input_len: int = 32
    output_len: int = 64
    timeout_s: float = 60.0  # a request not done by then has been lost: fail it rather than wait
    # Coordinator: react within a few steps of the CPU engine, restore soon after the burst.
    check_interval_s: float = 0.01
    drop_after_s: float = 0.02
    restore_after_s: float = 0.2
    timeline_interval_s: float = 0.05  # the burst lasts about a second


def demo_args(args: argparse.Namespace, demo: DemoConfig = DemoConfig()) -> argparse.Namespace:
    """`args` with the demo's settings in place of the model, engine, cluster and workload flags."""
    settings = asdict(demo)
    settings["compare"] = list(settings.pop("policies"))
    # Longer requests than the KV cache holds are refused anyway; saying so spares the engine's warning.
    settings["max_model_len"] = demo.num_kv_blocks * args.block_size
    return argparse.Namespace(**{**vars(args), **settings, "launch": True, "trace": None, "time_scale": None,
                                 "rate_scale": None, "trace_start_s": None, "trace_duration_s": None})


def run_demo(args: argparse.Namespace) -> dict:
    """Run the demo; warn when kunserve did not both drop and restore (the burst missed its point)."""
    record = run_launch(demo_args(args))
    kinds = [t["kind"] for run in record["runs"] if run["policy"] == KUNSERVE_POLICY for t in run["transitions"]]
    if DROP not in kinds or RESTORE not in kinds:
        logger.warning("the demo's burst did not make %s drop and restore (transitions: %s)", KUNSERVE_POLICY, kinds)
    return record
