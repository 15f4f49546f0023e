"""`kunserve bench --demo`: the headline experiment in about a minute on two CPU cores.

The embedded tiny model on two replicas (one single-threaded CPU worker process each), each
with a KV cache that holds one request at a time, takes a few bursts with calm in between.
A burst needs several times the KV the two replicas hold, but fits in what a pipeline group
of the two holds once each has dropped half of its layers. Under `recompute` the burst
queues and requests preempt one another; under `kunserve` the replicas drop and fuse as the
burst arrives, run it at once, and restore in the calm that follows. The demo sets the model,
the cluster, the workload and the engine settings below; other flags (--out-dir, --seed,
--no-progress, other engine flags) still apply.

SLOs are absolute, as a chat user sees them, not multiples of the unloaded latency: the tiny
model answers in a few milliseconds when idle, so "5x unloaded" would be a few tens of
milliseconds, below the noise of a shared CPU.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass

import numpy as np

from kunserve.bench.compare import DROP, KUNSERVE_POLICY, RESTORE
from kunserve.bench.launch import run_launch
from kunserve.bench.workload import RequestSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    policies: tuple[str, ...] = ("recompute", "kunserve")
    replicas: int = 2
    dispatch_policy: str = "round_robin"
    # Engine: the embedded tiny Llama; 8 blocks of 16 tokens hold one of the requests below
    # (6 blocks); a group of the two, each holding 2 of the 4 layers, holds about nine.
    model: str | None = None
    skip_tokenizer_init: bool = True  # token-id prompts; no text is looked at
    worker_threads: int = 1
    num_kv_blocks: int = 8
    max_num_seqs: int = 16
    # Several prompts per step: a group (one engine) then prefills as fast as its replicas did.
    max_num_batched_tokens: int = 512
    # Workload: `num_bursts` bursts of `burst_requests` arriving within `burst_span_s`, one
    # every `period_s`, with `calm_requests` spread over the calm between them (they fit).
    num_bursts: int = 4
    burst_requests: int = 8
    burst_span_s: float = 0.2
    calm_requests: int = 2
    period_s: float = 2.5
    input_len: int = 32
    output_len: int = 64
    timeout_s: float = 60.0  # a request not done by then has been lost: fail it rather than wait
    # Coordinator: react within a few steps of the CPU engine, restore soon after the burst.
    check_interval_s: float = 0.01
    drop_after_s: float = 0.02
    restore_after_s: float = 0.2
    timeline_interval_s: float = 0.05  # a burst lasts a fraction of a second
    # SLOs a chat user would hold any server to: the first token within a second, then at
    # least ten tokens a second (reading speed).
    slo_ttft_ms: float = 1000.0
    slo_tpot_ms: float = 100.0

    @property
    def num_prompts(self) -> int:
        return self.num_bursts * (self.burst_requests + self.calm_requests)


def demo_workload(demo: DemoConfig, seed: int) -> list[RequestSpec]:
    """The bursts and the calm requests between them, in arrival order; arrivals within a
    burst are uniform in its span (seeded), calm ones evenly spaced."""
    rng = np.random.default_rng(seed)
    arrivals: list[float] = []
    for burst in range(demo.num_bursts):
        start = burst * demo.period_s
        arrivals += list(start + rng.uniform(0.0, demo.burst_span_s, demo.burst_requests))
        calm = np.linspace(start + demo.burst_span_s, start + demo.period_s, demo.calm_requests + 2)[1:-1]
        arrivals += list(calm)
    return [RequestSpec(float(a), demo.input_len, demo.output_len) for a in sorted(arrivals)]


def demo_args(args: argparse.Namespace, demo: DemoConfig = DemoConfig()) -> argparse.Namespace:
    """`args` with the demo's settings in place of the model, engine, cluster and workload flags."""
    settings = asdict(demo)
    settings["compare"] = list(settings.pop("policies"))
    # Longer requests than the KV cache holds are refused anyway; saying so spares the engine's warning.
    settings["max_model_len"] = demo.num_kv_blocks * args.block_size
    return argparse.Namespace(**{**vars(args), **settings, "launch": True})


def run_demo(args: argparse.Namespace, demo: DemoConfig = DemoConfig()) -> dict:
    """Run the demo; warn when kunserve did not both drop and restore (the burst missed its point)."""
    record = run_launch(demo_args(args, demo), demo_workload(demo, args.seed))
    kinds = [t["kind"] for run in record["runs"] if run["policy"] == KUNSERVE_POLICY for t in run["transitions"]]
    if DROP not in kinds or RESTORE not in kinds:
        logger.warning("the demo's burst did not make %s drop and restore (transitions: %s)", KUNSERVE_POLICY, kinds)
    return record
