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
from kunserve.bench.report import PERCENT
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
    num_bursts: int = 5
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
    # SLOs in absolute terms: one request alone takes about 0.2 s here (64 tokens at ~3 ms),
    # so a first token later than SLO_TTFT_MS means the request queued behind others; ten
    # tokens a second is faster than anyone reads.
    slo_ttft_ms: float = 250.0
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
    """Run the demo and say what it showed; warn when kunserve did not both drop and restore
    (the bursts missed their point)."""
    record = run_launch(demo_args(args, demo), demo_workload(demo, args.seed))
    print("\n" + "\n".join(demo_story(record, demo)))
    kinds = [t["kind"] for run in record["runs"] if run["policy"] == KUNSERVE_POLICY for t in run["transitions"]]
    if DROP not in kinds or RESTORE not in kinds:
        logger.warning("the demo's burst did not make %s drop and restore (transitions: %s)", KUNSERVE_POLICY, kinds)
    return record


def demo_story(record: dict, demo: DemoConfig) -> list[str]:
    """What the demo showed, in a few lines: the bursts, each policy's queue and latency, the
    drops and restores, and the P99 TTFT ratio."""
    blocks_per_request = -(-(demo.input_len + demo.output_len) // record["args"]["block_size"])
    lines = [(
        f"What happened: {demo.num_bursts} bursts of {demo.burst_requests} requests (each burst within "
        f"{demo.burst_span_s} s, one every {demo.period_s} s, {demo.calm_requests} calm requests between) on "
        f"{demo.replicas} replicas; a request needs {blocks_per_request} KV blocks, a replica holds "
        f"{demo.num_kv_blocks}, so a burst needs {demo.burst_requests * blocks_per_request} of their "
        f"{demo.replicas * demo.num_kv_blocks}."
    )]
    for run in record["runs"]:
        summary, kinds = run["summary"], [t["kind"] for t in run["transitions"]]
        ttft = summary["ttft_ms"]
        attainment = summary["slo_attainment"]
        moves = (f"{kinds.count(DROP)} drops as bursts came, {kinds.count(RESTORE)} restores after them; "
                 if run["policy"] == KUNSERVE_POLICY else "")
        lines.append(
            f"  {run['policy']}: {moves}queue peaked at {summary['peak_waiting']} waiting requests; "
            f"{summary['preemptions']} preemptions; TTFT mean {ttft['mean']:.0f} ms, P99 {ttft['p99']:.0f} ms; "
            f"SLO attainment {'-' if attainment is None else f'{attainment * PERCENT:.0f}%'} "
            f"(TTFT <= {demo.slo_ttft_ms:.0f} ms, TPOT <= {demo.slo_tpot_ms:.0f} ms)"
        )
    if record["ttft_p99_ratio"] is not None:
        ratio = record["ttft_p99_ratio"]
        lines.append(f"  P99 TTFT, {ratio['baseline']} / {KUNSERVE_POLICY}: {ratio['ratio']:.1f}x")
    return lines
