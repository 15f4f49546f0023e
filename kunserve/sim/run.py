"""`kunserve simulate`: a workload (trace or synthetic, as `kunserve bench`) on N simulated
GPUs, once per overload policy, with the same JSON, table and plots as `bench --launch`.
For example, an hour of the Azure conversation trace on 32 simulated H200s:

kunserve simulate --model llama-3-8b --replicas 32 --trace data/traces/azure_llm_conv_2023.csv \
    --compare recompute kunserve --memory-budget 40 --out-dir $OUT/sim32

Step times come from the model's cost profile (kunserve/engine/profiles/, or --cost-profile);
the driver's host time and the transitions' fixed costs from the simulator flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
import typing
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from kunserve.bench.compare import comparison_table, transition_lines, ttft_p99_ratio
from kunserve.bench.in_process import (
    ITL_NOT_MEASURED,
    InProcessResult,
    preemption_counts,
    request_params,
    result_from_output,
)
from kunserve.bench.launch import (
    DEFAULT_REPLICAS,
    SKIPPED_ENGINE_FLAGS,
    add_comparison_arguments,
    policies_of,
    write_outputs,
)
from kunserve.bench.report import MS_PER_S, latency_stats, summarize
from kunserve.bench.run import add_workload_arguments, build_workload, json_args
from kunserve.bench.slo import UNLOADED_REQUESTS, derive_slo, reference_shape, unloaded_reference
from kunserve.bench.timeline import Clock, TransitionRecorder, peak_waiting, snapshot
from kunserve.bench.workload import RequestSpec
from kunserve.cluster.status import count_cycles
from kunserve.cluster_args import add_cluster_arguments, coordinator_config
from kunserve.config import EngineConfig, GiB
from kunserve.engine_args import add_engine_arguments, engine_config
from kunserve.sim.cluster import SimulatedCluster
from kunserve.sim.settings import SimulatorConfig

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "llama-3-8b"
H200_MEMORY_GIB = 139.8  # what torch reports of a lent H200 (143771 MiB)
# What a GPU holds before the engine's arena (CUDA context, kernels, allocator slack), as
# torch.cuda.mem_get_info shows on a lent H200 just before the arena is made.
DEVICE_RESERVED_GIB = 1.0
UNLOADED_GAP_S = 1.0e4  # between the unloaded requests: each runs alone
TIMELINE_POINTS = 400  # about this many timeline samples per run, whatever its length


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a preset or model directory (default %(default)s)")
    parser.add_argument("--device-memory-gib", type=float, default=H200_MEMORY_GIB,
                        help="each simulated GPU's memory, with --gpu-memory-utilization when no --memory-budget "
                             "is given (default: an H200's, %(default)s)")
    add_workload_arguments(parser)
    add_comparison_arguments(parser)
    add_cluster_arguments(parser, DEFAULT_REPLICAS)
    add_engine_arguments(parser, skip=SKIPPED_ENGINE_FLAGS)
    parser.add_argument("--links-open-at-start", action=argparse.BooleanOptionalAction, default=True,
                        help="open every pair's peer links before serving, as a live server (kunserve serve) and "
                             "bench --launch do (default: on; --no-links-open-at-start: the first drop or "
                             "migration of a pair opens them, at the measured cost)")
    hints = typing.get_type_hints(SimulatorConfig)
    for f in dataclasses.fields(SimulatorConfig):
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        default = "the measured profile's" if f.default is None else f.default
        flag = "--sim-" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, dest=f"sim_{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                                help=f"(default: {default})")
        else:
            parser.add_argument(flag, dest=f"sim_{f.name}", type=kind, default=f.default, help=f"(default: {default})")


def simulator_config(args: argparse.Namespace) -> SimulatorConfig:
    return SimulatorConfig(**{f.name: getattr(args, f"sim_{f.name}") for f in dataclasses.fields(SimulatorConfig)})


def run_simulate(args: argparse.Namespace) -> dict:
    """Simulate the workload `args` describe once per policy; print the table, write --out-dir."""
    policies = policies_of(args)
    config = simulated_engine_config(args)
    specs = build_workload(args)
    wall_start = time.perf_counter()
    runs = [simulate_policy(config, args, policy, specs) for policy in policies]
    logger.info("simulated %d request(s) x %d policies on %d replica(s) in %.1f s", len(specs), len(policies),
                args.replicas, time.perf_counter() - wall_start)
    record = {"args": json_args(args), "simulated": True, "runs": runs, "ttft_p99_ratio": ttft_p99_ratio(runs)}
    print(comparison_table(runs))
    for run in runs:
        print("\n".join(transition_lines(run)))
    if args.out_dir is not None:
        write_outputs(record, Path(args.out_dir))
    return record


def simulated_engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engines' settings: the flags, with dummy weights on (simulated) GPUs."""
    return engine_config(args, model=args.model, load_format="dummy", device="cuda")


def simulate_policy(config: EngineConfig, args: argparse.Namespace, policy: str, specs: list[RequestSpec]) -> dict:
    coordinator = coordinator_config(args, policy)
    budget = int((args.device_memory_gib * config.gpu_memory_utilization - DEVICE_RESERVED_GIB) * GiB)

    def cluster() -> SimulatedCluster:
        return SimulatedCluster(config, args.replicas, coordinator, args.dispatch_policy, simulator_config(args),
                                budget)

    prompt_len, output_len = reference_shape(specs)
    unloaded = [RequestSpec(i * UNLOADED_GAP_S, prompt_len, output_len) for i in range(UNLOADED_REQUESTS)]
    reference = unloaded_reference(replay(cluster(), unloaded)[0], prompt_len, output_len)
    slo = derive_slo(reference, args.slo_ttft_ms, args.slo_tpot_ms)

    simulated = cluster()
    if args.links_open_at_start:
        simulated.open_all_links()
    recorder = TransitionRecorder(simulated.coordinator, Clock(0.0, 0.0))
    span = specs[-1].arrival_s if specs else 0.0
    logger.info("policy %s: %d requests over %.0f s on %d simulated GPU(s)", policy, len(specs), span,
                args.replicas * config.pipeline_parallel_size)
    wall_start = time.perf_counter()
    with tqdm(total=round(span), unit="s", desc=f"{policy} (simulated time)", disable=args.no_progress) as bar:
        results, samples = replay(simulated, specs, max(span, 1.0) / TIMELINE_POINTS, bar)
    logger.info("policy %s: done in %.1f s", policy, time.perf_counter() - wall_start)
    done = [r for r in results if r.error is None]
    duration = max((r.sent_at + r.e2e_s for r in done), default=0.0) - min((s.arrival_s for s in specs), default=0.0)
    summary = summarize(results, duration, slo_ttft_s=slo.ttft_s, slo_tpot_s=slo.tpot_s)
    summary["queue_ms"] = latency_stats([r.queue_s for r in done if r.queue_s is not None])
    summary.update(preemption_counts(results))
    summary["peak_waiting"] = peak_waiting(samples)
    summary["itl_note"] = ITL_NOT_MEASURED
    summary["simulated_s"] = simulated.clock()
    transitions = recorder.records()
    summary["cycles"] = count_cycles(transitions, coordinator.cycle_window_s)
    return {
        "policy": policy,
        "summary": summary,
        "unloaded": asdict(reference),
        "slo": {"ttft_ms": None if slo.ttft_s is None else slo.ttft_s * MS_PER_S,
                "tpot_ms": None if slo.tpot_s is None else slo.tpot_s * MS_PER_S},
        "kv_blocks_per_replica": simulated.engines[0].block_manager.num_total_blocks,
        "timeline": samples,
        "transitions": transitions,
        "results": [asdict(r) for r in results],
    }


def replay(
    cluster: SimulatedCluster, specs: list[RequestSpec], sample_every_s: float | None = None,
    progress: tqdm | None = None,
) -> tuple[list[InProcessResult], list[dict]]:
    """Each request's result (refused or lost ones with their error) and the timeline;
    `progress` advances to each sample's simulated second."""
    prompts = [[0] * spec.prompt_len for spec in specs]  # a simulation reads no token values
    params = [request_params(spec.output_len) for spec in specs]
    samples: list[dict] = []

    def take_sample(t_s: float) -> None:
        if (sample := snapshot(cluster.coordinator, t_s)) is not None:
            samples.append(sample)
        if progress is not None and (ahead := min(round(t_s), progress.total) - progress.n) > 0:
            progress.update(ahead)

    outputs = cluster.run([s.arrival_s for s in specs], prompts, params, sample_every_s, take_sample)
    results = []
    for i, spec in enumerate(specs):
        request_id = f"{i}"
        if request_id in outputs:
            results.append(result_from_output(outputs[request_id], spec.prompt_len, spec.output_len, spec.arrival_s))
        else:
            results.append(InProcessResult(spec.prompt_len, spec.output_len, spec.arrival_s,
                                           error=cluster.refused.get(request_id, "request did not finish")))
    return results, samples

