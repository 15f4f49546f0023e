"""`kunserve bench --launch`: start the cluster in this process and replay the workload on it,
once per overload policy (`--compare`), one cluster after another. For example:

kunserve bench --launch --compare recompute kunserve --trace data/traces/azure_llm_conv_2023.csv \
    --trace-duration-s 300 --rate-scale 4 --load-format dummy --model llama-3-8b --out-dir $OUT/overload

Each run warms every replica up (one request each), measures the unloaded latency (a few
requests of the workload's median shape, one at a time: the SLO reference, see
kunserve/bench/slo.py), then replays the workload while sampling the coordinator's view
(kunserve/bench/timeline.py), and waits for any pipeline group to restore before the
cluster shuts down.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kunserve.bench.compare import comparison_table, transition_lines, ttft_p99_ratio
from kunserve.bench.in_process import ITL_NOT_MEASURED, InProcessResult, preemption_counts, replay, send_one
from kunserve.bench.plots import plot_timeline, plot_ttft_cdf
from kunserve.bench.report import MS_PER_S, format_table, latency_stats, summarize
from kunserve.bench.run import build_workload, json_args, log_failures
from kunserve.bench.slo import (
    SLO_TPOT_FACTOR,
    SLO_TTFT_FACTOR,
    UNLOADED_REQUESTS,
    UnloadedReference,
    derive_slo,
    reference_shape,
    unloaded_reference,
)
from kunserve.bench.timeline import (
    DEFAULT_TIMELINE_INTERVAL_S,
    Clock,
    TransitionRecorder,
    peak_waiting,
    sample_until,
)
from kunserve.bench.workload import RequestSpec, prompt_token_ids
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.policies.registry import OVERLOAD_POLICIES
from kunserve.cluster.status import count_cycles
from kunserve.cluster_args import add_cluster_arguments, coordinator_config
from kunserve.config import EngineConfig
from kunserve.engine_args import add_engine_arguments, engine_config

logger = logging.getLogger(__name__)

DEFAULT_REPLICAS = 2  # the fewest that can fuse into a pipeline group
# After the last request: how long a pipeline group may take to restore (the timeline shows it).
SETTLE_TIMEOUT_S = 30.0
SETTLE_POLL_S = 0.05
WARMUP_ID_PREFIX = "warmup-"
UNLOADED_ID_PREFIX = "unloaded-"
REPLAY_ID_PREFIX = "req-"
# Engine flags the bench already has: --model (the model to serve) and --seed (the workload's).
SKIPPED_ENGINE_FLAGS = ("model", "seed")
RESULTS_FILE = "results.json"
JSON_DIGITS = 9  # significant digits a float keeps in results.json (relative error below 1e-8)
TABLE_FILE = "table.md"
TTFT_CDF_FILE = "ttft_cdf.png"
TIMELINE_FILE = "timeline_{policy}.png"


@dataclass
class LaunchSettings:
    """How each policy's cluster is run and measured (all but the engine and the policy)."""

    num_replicas: int
    dispatch_policy: str
    coordinator: CoordinatorConfig  # its overload_policy is replaced per run
    timeline_interval_s: float
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    timeout_s: float
    max_concurrency: int | None
    show_progress: bool
    max_prompt_token_id: int
    seed: int  # of the prompts


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """--launch, --demo, the comparison's flags, and the cluster's and engines' (as `kunserve
    serve` has them)."""
    parser.add_argument("--launch", action="store_true", help="start the cluster in this process instead of a URL")
    parser.add_argument("--demo", action="store_true",
                        help="two tiny KV-starved CPU replicas through bursts, recompute vs kunserve (about a minute)")
    add_comparison_arguments(parser)
    add_cluster_arguments(parser, DEFAULT_REPLICAS)
    add_engine_arguments(parser, skip=SKIPPED_ENGINE_FLAGS)


def add_comparison_arguments(parser: argparse.ArgumentParser) -> None:
    """--compare, the timeline's interval and --out-dir: shared by `bench --launch` and `simulate`."""
    parser.add_argument("--compare", nargs="+", choices=OVERLOAD_POLICIES, default=None, metavar="POLICY",
                        help=f"run once per policy, same workload, and compare; some of {', '.join(OVERLOAD_POLICIES)} "
                             "(default: --overload-policy alone)")
    parser.add_argument("--timeline-interval-s", type=float, default=DEFAULT_TIMELINE_INTERVAL_S,
                        help="how often the timeline samples the cluster")
    parser.add_argument("--out-dir", default=None,
                        help=f"write {RESULTS_FILE}, {TABLE_FILE}, {TTFT_CDF_FILE} and timeline_<policy>.png here "
                             "(default: none)")


def policies_of(args: argparse.Namespace) -> list[str]:
    """The policies to run, in order: --compare's, or --overload-policy alone."""
    policies = list(args.compare) if args.compare else [args.overload_policy]
    unknown = [p for p in policies if p not in OVERLOAD_POLICIES]
    if unknown:
        raise ValueError(f"overload policies {unknown}: expected some of {OVERLOAD_POLICIES}")
    if len(set(policies)) != len(policies):
        raise ValueError(f"--compare: each policy once, got {policies}")
    return policies


def launch_settings(args: argparse.Namespace) -> LaunchSettings:
    return LaunchSettings(
        num_replicas=args.replicas,
        dispatch_policy=args.dispatch_policy,
        coordinator=coordinator_config(args),
        timeline_interval_s=args.timeline_interval_s,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        timeout_s=args.timeout_s,
        max_concurrency=args.max_concurrency,
        show_progress=not args.no_progress,
        max_prompt_token_id=args.max_prompt_token_id,
        seed=args.seed,
    )


def run_launch(args: argparse.Namespace, specs: list[RequestSpec] | None = None) -> dict:
    """Run the workload `args` describe (or `specs`) once per policy; print the table, write
    --out-dir (and --out), return the record written to results.json."""
    policies = policies_of(args)
    settings = launch_settings(args)
    config = engine_config(args, model=args.model)
    specs = build_workload(args) if specs is None else specs
    prompts = prompt_token_ids(specs, settings.max_prompt_token_id, settings.seed)
    logger.info("%d requests over %.1f s on %d replica(s), policies %s", len(specs), specs[-1].arrival_s,
                settings.num_replicas, policies)
    runs = [run_policy(config, settings, policy, specs, prompts) for policy in policies]
    record = {"args": json_args(args), "runs": runs, "ttft_p99_ratio": ttft_p99_ratio(runs)}
    if len(runs) == 1:
        print(format_table(runs[0]["summary"]))
        print(f"itl: {ITL_NOT_MEASURED}")
    else:
        print(comparison_table(runs))
    for run in runs:
        print("\n".join(transition_lines(run)))
    if args.out_dir is not None:
        write_outputs(record, Path(args.out_dir))
    if args.out is not None:
        _write_json(record, Path(args.out))
    return record


def run_policy(
    config: EngineConfig, settings: LaunchSettings, policy: str, specs: list[RequestSpec], prompts: list[list[int]]
) -> dict:
    """Launch a cluster under `policy`, measure it, shut it down; the run's record."""
    coordinator = dataclasses.replace(settings.coordinator, overload_policy=policy)
    logger.info("policy %s: starting %d replica(s)", policy, settings.num_replicas)
    cluster = Cluster.launch(config, settings.num_replicas, settings.dispatch_policy, None, coordinator,
                             open_links=False)  # opened (and timed) by open_peer_links
    try:
        links_s = open_peer_links(cluster)
        record = asyncio.run(_measure(cluster, settings, specs, prompts))
    finally:
        cluster.shutdown()
    return {"policy": policy, "peer_links_s": links_s, **record}


def open_peer_links(cluster: Cluster) -> float | None:
    """Open the replicas' peer links (mapped arenas, warmed activation links) before the loops
    start, for every policy alike. The first drop among replicas would otherwise open them,
    with the loops paused (about half a second on CPU): a one-time cost a long-running server
    pays once, not at every burst. Returns the seconds it took; None where replicas cannot link
    (one replica, or replicas that are not one worker process each)."""
    if len(cluster.engines) < 2:
        return None
    begin = time.perf_counter()
    try:
        cluster.open_links()
    except ValueError as error:
        logger.info("no peer links: %s", error)
        return None
    return time.perf_counter() - begin


async def _measure(
    cluster: Cluster, settings: LaunchSettings, specs: list[RequestSpec], prompts: list[list[int]]
) -> dict:
    cluster.start(asyncio.get_running_loop())
    # Warm-up and unloaded requests have the workload's median shape (their own prompts).
    prompt_len, output_len = reference_shape(specs)
    shaped = [RequestSpec(0.0, prompt_len, output_len)] * max(len(cluster.replicas), UNLOADED_REQUESTS)
    shaped_prompts = prompt_token_ids(shaped, settings.max_prompt_token_id, settings.seed)
    await warm_up(cluster, shaped_prompts, output_len, settings.timeout_s)
    reference = await measure_unloaded(cluster, shaped_prompts[:UNLOADED_REQUESTS], output_len, settings.timeout_s)
    slo = derive_slo(reference, settings.slo_ttft_ms, settings.slo_tpot_ms)

    start = Clock.now()
    recorder = TransitionRecorder(cluster.coordinator, start)
    samples: list[dict] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(
        sample_until(cluster.coordinator, start, settings.timeline_interval_s, stop, samples)
    )
    results, duration = await replay(
        cluster, specs, prompts, request_id_prefix=REPLAY_ID_PREFIX, timeout_s=settings.timeout_s,
        max_concurrency=settings.max_concurrency, show_progress=settings.show_progress,
    )  # fmt: skip
    settled = await settle(cluster)
    stop.set()
    await sampler

    summary = summarize(results, duration, slo_ttft_s=slo.ttft_s, slo_tpot_s=slo.tpot_s)
    summary["queue_ms"] = latency_stats([r.queue_s for r in results if r.error is None and r.queue_s is not None])
    summary.update(preemption_counts(results))
    summary["peak_waiting"] = peak_waiting(samples)
    summary["itl_note"] = ITL_NOT_MEASURED
    transitions = recorder.records()
    summary["cycles"] = count_cycles(transitions, settings.coordinator.cycle_window_s)
    log_failures([r.error for r in results], None, specs)
    return {
        "summary": summary,
        "unloaded": asdict(reference),
        "slo": {
            "ttft_ms": None if slo.ttft_s is None else slo.ttft_s * MS_PER_S,
            "tpot_ms": None if slo.tpot_s is None else slo.tpot_s * MS_PER_S,
            "ttft_factor": None if settings.slo_ttft_ms is not None else SLO_TTFT_FACTOR,
            "tpot_factor": None if settings.slo_tpot_ms is not None else SLO_TPOT_FACTOR,
        },
        "settled": settled,
        "timeline": samples,
        "transitions": transitions,
        "results": [asdict(r) for r in results],
    }


async def warm_up(cluster: Cluster, prompts: list[list[int]], output_len: int, timeout_s: float) -> None:
    """One request through each replica at once, so first-use costs (kernels, graphs, the
    allocator's first growth) do not land on measured requests (peer links: `open_peer_links`).
    Raises if one fails: a cluster that cannot serve one request measures nothing."""
    results = await asyncio.gather(
        *(send_one(replica, f"{WARMUP_ID_PREFIX}{i}", prompt, output_len, timeout_s)
          for i, (replica, prompt) in enumerate(zip(cluster.replicas, prompts)))
    )  # fmt: skip
    failed = [r.error for r in results if r.error is not None]
    if failed:
        raise RuntimeError(f"warm-up request failed: {failed[0]}")


async def measure_unloaded(
    cluster: Cluster, prompts: list[list[int]], output_len: int, timeout_s: float
) -> UnloadedReference:
    """Each prompt alone on the idle cluster, one after another; their mean TTFT and TPOT."""
    results: list[InProcessResult] = []
    for i, prompt in enumerate(prompts):
        results.append(await send_one(cluster, f"{UNLOADED_ID_PREFIX}{i}", prompt, output_len, timeout_s))
    reference = unloaded_reference(results, len(prompts[0]), output_len)
    logger.info("unloaded reference: %s", reference)
    return reference


async def settle(cluster: Cluster) -> bool:
    """Wait (up to SETTLE_TIMEOUT_S) until no pipeline group is left; whether none is."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while cluster.coordinator.runner.groups and time.monotonic() < deadline:
        await asyncio.sleep(SETTLE_POLL_S)
    if cluster.coordinator.runner.groups:
        logger.warning("%d pipeline group(s) not restored %.0f s after the last request",
                       len(cluster.coordinator.runner.groups), SETTLE_TIMEOUT_S)
    return not cluster.coordinator.runner.groups


def write_outputs(record: dict, out_dir: Path) -> None:
    """results.json, table.md, the TTFT CDF and each policy's timeline."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(record, out_dir / RESULTS_FILE)
    (out_dir / TABLE_FILE).write_text(comparison_table(record["runs"]) + "\n")
    plot_ttft_cdf(record["runs"], out_dir / TTFT_CDF_FILE)
    for run in record["runs"]:
        plot_timeline(run, out_dir / TIMELINE_FILE.format(policy=run["policy"]))
    logger.info("wrote %s", out_dir)


def _write_json(record: dict, path: Path) -> None:
    """Compact JSON, numbers rounded: a run's per-request results make most of the file (tens of
    thousands of requests in a simulated hour)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rounded(record), separators=(",", ":")))


def rounded(value: object) -> object:
    """`value` with every finite float rounded to JSON_DIGITS significant digits, at any depth."""
    if isinstance(value, float):
        return float(f"{value:.{JSON_DIGITS}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item) for item in value]
    return value
