"""The KunServe paper's evaluation (arXiv 2412.18169), reproduced on the simulator: one
command, a Markdown table per figure, plots, and a JSON of every run's summary.
docs/paper.md puts the paper's numbers beside these and says what differs and why.

    python benchmarks/paper.py --quick --out-dir results/paper_quick   # CPU, a few minutes
    python benchmarks/paper.py --out-dir docs/results/paper            # the full run

Figures:
* e2e: each workload on each setup (model, GPUs, memory per GPU) under every policy:
  recompute (vLLM, data-parallel), pp2 (vLLM, static 2-stage pipelines), swap (InferCept),
  migrate (Llumnix), kunserve. P50/P90/P99/P99.9 TTFT and TPOT, output throughput, and SLO
  attainment with the paper's relative SLOs (5x the best baseline's P50 TTFT and TPOT for
  chat sets, 10x for LongBench-like).
* ablation: kunserve's parts added one at a time (a drop whose KV moves at our first
  version's NCCL rate, + the coordinated exchange, + lookahead batching), and restoring
  against never restoring.
* sweep: P99 TTFT per policy from 0.5x to 4x the calibrated load (plotted).
* group_factor: kunserve's figures as the group's stages run 1.0x, the graphed-stage lower
  bound (docs/results/group_speed_bound_2026-12-02.json), the measured (eager stages,
  kunserve/sim/profiles/group_stage.json, used everywhere else) and 1.5x the cost model: how
  much rests on that number.
* sweep also runs kunserve-swap (kunserve whose replicas and groups swap when they preempt):
  whether kunserve with its fallback is never worse than swap at any load.

Workloads: the Azure code trace (bursty) and conversation trace, and request sets with the
paper's length statistics (kunserve/bench/workload.py DATASETS) on the code trace's bursty
arrivals. Each workload's rate is scaled TraceUpscaler-style (the trace's bursts kept) so
that the mean KV demand under recompute sits at CALIBRATED_DEMAND of the cluster's KV memory
(the paper provisions KV at 2.1x the mean demand); the code trace keeps its own rate (its
overload is of compute). Everything here is simulated (kunserve/sim/): step times from the
cost profiles measured on an H200, host time measured, group stages from a measured factor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing
import time
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: files only, no display

import matplotlib.pyplot as plt
import numpy as np

from kunserve.bench.report import MS_PER_S
from kunserve.bench.run import build_workload
from kunserve.cluster.status import count_cycles
from kunserve.engine.cost_model import CostModel
from kunserve.model.presets import resolve_model
from kunserve.sim.executor import GROUP_STAGE_PROFILE
from kunserve.sim.run import add_simulate_arguments, simulate_policy, simulated_engine_config

logger = logging.getLogger(__name__)

CODE_TRACE = "data/traces/azure_llm_code_2023_first_half.csv"
CONV_TRACE = "data/traces/azure_llm_conv_2023.csv"
POLICIES = ("recompute", "pp2", "swap", "migrate", "kunserve")
KUNSERVE = "kunserve"
KUNSERVE_SWAP = "kunserve-swap"  # kunserve whose replicas and groups swap when they preempt (the sweep's fallback check)
OURS = (KUNSERVE, KUNSERVE_SWAP)  # never a baseline
STATIC_PIPELINE = "pp2"  # recompute on static 2-stage pipelines (vLLM PP)
PERCENTILES = (50, 90, 99, 99.9)
CALIBRATED_DEMAND = 0.55  # mean KV demand / KV memory the load is scaled to (the paper: 50-60%)
CALIBRATION_TOLERANCE = 0.05  # a scale whose demand is this near CALIBRATED_DEMAND ends the search (50-60%)
CHAT_SLO_FACTOR, LONGBENCH_SLO_FACTOR = 5, 10  # the paper's relative SLOs: N x the best baseline's P50
SWEEP = (0.5, 1.0, 2.0, 4.0)  # load factors of the sweep
GROUP_FACTORS = (1.0, 1.5)  # beside the measured factor and the graphed-stage bound
# One H200, a 2-stage Llama-3-8B group's graphed stages timed one at a time (benchmarks/group_speed.py
# --mode bound): g * max(stage step) / replica step, a lower bound of a group's cycle (no exchange,
# bubbles or link time). The sensitivity row takes the median of its batches and contexts.
GRAPHED_STAGE_BOUND = Path("docs/results/group_speed_bound_2026-12-02.json")
FIRST_VERSION_EXCHANGE_BYTES_S = 60.5e9  # our first exchange (NCCL point-to-point), docs/benchmarks.md issue 6
H200_BUDGET_GIB = None  # memory per GPU: None is 0.9 of an H200's (the simulator's default)
WEIGHT_SHARE = 0.344  # the paper's Qwen2.5-14B: 28 GB of weights in an 80 GB GPU


@dataclass(frozen=True)
class Workload:
    name: str
    trace: str  # its arrivals (and, with no dataset, its lengths)
    start_s: float
    duration_s: float
    dataset: str | None = None  # lengths drawn like this set's (kunserve/bench/workload.py)
    slo_factor: int = CHAT_SLO_FACTOR
    calibrate: bool = True  # scale its rate to CALIBRATED_DEMAND (else keep the trace's)


@dataclass(frozen=True)
class Setup:
    model: str
    gpus: int
    memory_gib: float | None  # per GPU; None: 0.9 of an H200

    @property
    def label(self) -> str:
        memory = "H200" if self.memory_gib is None else f"{self.memory_gib:g} GiB"
        return f"{self.model}, {self.gpus} GPUs, {memory}"


@dataclass(frozen=True)
class Plan:
    e2e: list[tuple[Setup, Workload]]
    ablation: tuple[Setup, Workload]
    sweep: tuple[Setup, Workload]
    sweep_policies: tuple[str, ...]
    sweep_loads: tuple[float, ...]
    group_factor: tuple[Setup, Workload]
    calibration_rounds: int


def weights_gib(model: str) -> float:
    """Bytes of a model's weights (bf16), in GiB."""
    spec = resolve_model(model).spec
    layer = CostModel.default(spec, model).layer_bytes
    embeddings = (1 + (not spec.tie_word_embeddings)) * spec.vocab_size * spec.hidden_size * 2
    return (spec.num_layers * layer + embeddings) / (1 << 30)


def paper_budget_gib(model: str) -> float:
    """Memory per GPU in which the model's weights take the paper's share."""
    return round(weights_gib(model) / WEIGHT_SHARE)


def plan(quick: bool) -> Plan:
    """What each figure runs: the full evaluation, or a small one that shows every figure."""
    if quick:
        window = (810.0, 60.0)  # the code trace's burst at 840 s
        small = Setup("llama-3-8b", 2, 24)
        reasoning = Workload("reasoning", CODE_TRACE, *window, "reasoning")
        code = Workload("code", CODE_TRACE, *window, calibrate=False)
        longbench = Workload("longbench", CODE_TRACE, *window, "longbench", LONGBENCH_SLO_FACTOR)
        return Plan([(small, code), (small, reasoning)], (small, longbench), (small, reasoning),
                    ("recompute", "swap", KUNSERVE, KUNSERVE_SWAP), SWEEP[:-1], (small, reasoning), calibration_rounds=6)
    window = (690.0, 300.0)  # five minutes around the code trace's peak
    workloads = {name: Workload(name, CODE_TRACE, *window, name, LONGBENCH_SLO_FACTOR if name == "longbench"
                                else CHAT_SLO_FACTOR)
                 for name in ("burstgpt", "sharegpt", "longbench", "reasoning")}
    workloads["code"] = Workload("code", CODE_TRACE, *window, calibrate=False)
    workloads["conv"] = Workload("conv", CONV_TRACE, 1200.0, 300.0)
    eight_gib = paper_budget_gib("llama-3-8b")
    e2e = [(Setup("llama-3-8b", 2, eight_gib), workloads[name])
           for name in ("conv", "burstgpt", "sharegpt", "longbench", "reasoning")]
    e2e += [(Setup("llama-3-8b", 2, memory), workloads["code"]) for memory in (24, 40)]
    e2e += [(Setup("llama-3-8b", 8, eight_gib), workloads[name]) for name in ("longbench", "reasoning")]
    e2e += [(Setup("llama-3-8b", 8, 24), workloads["code"])]
    fourteen = Setup("qwen2.5-14b", 8, paper_budget_gib("qwen2.5-14b"))
    e2e += [(fourteen, workloads["longbench"])]
    e2e += [(Setup("qwen2.5-32b", 2, H200_BUDGET_GIB), workloads[name]) for name in ("longbench", "reasoning")]
    eight = Setup("llama-3-8b", 8, eight_gib)
    return Plan(e2e, (fourteen, workloads["longbench"]), (eight, workloads["reasoning"]), (*POLICIES, KUNSERVE_SWAP), SWEEP,
                (eight, workloads["reasoning"]), calibration_rounds=10)


# ---- running the simulator -----------------------------------------------------------------


def simulator_args(setup: Setup, workload: Workload, rate_scale: float | None, cost_profile: str | None
                   ) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    args = parser.parse_args([])
    args.model, args.replicas = setup.model, setup.gpus
    args.memory_budget_bytes = None if setup.memory_gib is None else int(setup.memory_gib * (1 << 30))
    args.max_model_len = 8192
    args.trace, args.trace_start_s, args.trace_duration_s = workload.trace, workload.start_s, workload.duration_s
    args.dataset, args.rate_scale, args.cost_profile = workload.dataset, rate_scale, cost_profile
    return args


def run_policy(setup: Setup, workload: Workload, rate_scale: float | None, policy: str, cost_profile: str | None,
               **overrides: object) -> dict:
    """One simulated run: its record (simulate_policy's), with `overrides` set on the
    simulator's arguments (sim_* flags, restore_after_s, lookahead_batching, ...)."""
    args = simulator_args(setup, workload, rate_scale, cost_profile)
    for key, value in overrides.items():
        setattr(args, key, value)
    specs = build_workload(args)
    if policy == STATIC_PIPELINE:
        args.replicas, args.pipeline_parallel_size = setup.gpus // 2, 2
    start = time.perf_counter()
    record = simulate_policy(simulated_engine_config(args), args, "recompute" if policy == STATIC_PIPELINE
                             else policy, specs)
    record["policy"] = policy
    record["wall_s"] = time.perf_counter() - start
    record["requests"] = len(specs)
    record["window"] = (specs[0].arrival_s, specs[-1].arrival_s) if specs else (0.0, 0.0)
    return record


@dataclass(frozen=True)
class Run:
    """One simulated run to make: run_policy's arguments."""
    setup: Setup
    workload: Workload
    rate_scale: float | None
    policy: str
    cost_profile: str | None
    overrides: dict = field(default_factory=dict)

    def __call__(self) -> dict:
        return run_policy(self.setup, self.workload, self.rate_scale, self.policy, self.cost_profile,
                          **self.overrides)


_POOL: Executor | None = None  # --jobs > 1: independent runs go to these processes


def start_pool(jobs: int) -> None:
    """Independent runs go to `jobs` processes from now on (none for 1): spawned, not forked,
    a fresh interpreter each, logging set the same."""
    global _POOL
    if jobs > 1:
        _POOL = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=configure_logging)


def stop_pool() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.shutdown()
        _POOL = None


def run_all(runs: list[Run]) -> list[dict]:
    """Each run's record, in order: in the pool's processes when there is one (every run is
    independent and deterministic, so the figures do not depend on --jobs)."""
    if _POOL is None:
        return [run() for run in runs]
    futures = {_POOL.submit(run): i for i, run in enumerate(runs)}
    records: list[dict] = [{}] * len(runs)
    for done, future in enumerate(as_completed(futures), 1):
        i = futures[future]
        records[i] = future.result()
        logger.info("%d of %d runs done: %s / %s, %s, rate scale %s (%.0f s)", done, len(runs), runs[i].setup.label,
                    runs[i].workload.name, runs[i].policy, runs[i].rate_scale, records[i]["wall_s"])
    return records


def mean_demand(record: dict) -> float:
    """Time-averaged KV demand (blocks in use plus queued) over the cluster's KV blocks, over
    the window the requests arrived in."""
    total = record["kv_blocks_per_replica"]
    start, end = record["window"]
    fractions = [sum(r["kv_usage"] * total + r["queued_demand_blocks"] for r in sample["replicas"])
                 / (total * len(sample["replicas"]))
                 for sample in record["timeline"] if start <= sample["t_s"] <= end]
    return float(np.mean(fractions)) if fractions else 0.0


@dataclass
class Calibration:
    rate_scale: float | None  # None: the trace's own rate
    demand: float  # the mean KV demand measured at it
    recompute: dict  # that run's record


_CALIBRATIONS: dict[tuple[Setup, Workload], Calibration] = {}  # one per setup and workload, for every figure


def calibrate(setup: Setup, workload: Workload, rounds: int, cost_profile: str | None) -> Calibration:
    return calibrate_all([(setup, workload)], rounds, {setup.model: cost_profile})[0]


def calibrate_all(pairs: list[tuple[Setup, Workload]], rounds: int, profiles: dict[str, str | None]
                  ) -> list[Calibration]:
    """Each setup and workload's calibration; those not made yet side by side with --jobs
    (each one's search is serial)."""
    missing = list(dict.fromkeys(pair for pair in pairs if pair not in _CALIBRATIONS))
    searches = [(setup, workload, rounds, profiles.get(setup.model)) for setup, workload in missing]
    made = (_POOL.map(_calibrate, *zip(*searches)) if _POOL is not None and searches
            else (_calibrate(*search) for search in searches))
    _CALIBRATIONS.update(zip(missing, made))
    return [_CALIBRATIONS[pair] for pair in pairs]


def _calibrate(setup: Setup, workload: Workload, rounds: int, cost_profile: str | None) -> Calibration:
    """The rate scale that puts the mean KV demand under recompute nearest CALIBRATED_DEMAND
    (the trace's own rate for a workload not calibrated), with the recompute run at it. The
    demand grows with the rate, steeply near overload: the scale is bracketed by doubling or
    halving, then bisected (geometrically) until a demand falls within CALIBRATION_TOLERANCE or
    `rounds` runs were made (near capacity the demand jumps: queues pile up)."""
    if not workload.calibrate:
        record = run_policy(setup, workload, None, "recompute", cost_profile)
        return Calibration(None, mean_demand(record), record)
    tried: dict[float, dict] = {}

    def demand_at(scale: float) -> float:
        tried[scale] = run_policy(setup, workload, scale, "recompute", cost_profile)
        return mean_demand(tried[scale])

    low, high = 0.0, math.inf
    scale = setup.gpus / 2  # every GPU sees the load two did at the trace's rate
    for _ in range(rounds):
        demand = demand_at(scale)
        if abs(demand - CALIBRATED_DEMAND) <= CALIBRATION_TOLERANCE:
            break
        if demand > CALIBRATED_DEMAND:
            high = scale
        else:
            low = scale
        scale = high / 2 if low == 0.0 else low * 2 if math.isinf(high) else math.sqrt(low * high)
    best = min(tried, key=lambda s: abs(mean_demand(tried[s]) - CALIBRATED_DEMAND))
    logger.info("%s / %s: rate scale %.3f, mean KV demand %.2f", setup.label, workload.name, best,
                mean_demand(tried[best]))
    if abs(mean_demand(tried[best]) - CALIBRATED_DEMAND) > CALIBRATION_TOLERANCE:
        logger.warning("%s / %s: no scale within %d runs put the mean KV demand within %.2f of %.2f",
                       setup.label, workload.name, rounds, CALIBRATION_TOLERANCE, CALIBRATED_DEMAND)
    return Calibration(best, mean_demand(tried[best]), tried[best])


# ---- what a run shows ----------------------------------------------------------------------


def percentiles(values_s: list[float]) -> dict[str, float | None]:
    values = np.asarray(values_s, dtype=float) * MS_PER_S
    return {f"p{q:g}": (float(np.percentile(values, q)) if len(values) else None) for q in PERCENTILES}


def request_tpot(result: dict) -> float | None:
    if result["ttft_s"] is None or result["output_tokens"] <= 1:
        return None
    return (result["e2e_s"] - result["ttft_s"]) / (result["output_tokens"] - 1)


def summarize(record: dict, window_s: float) -> dict:
    """The figures of one run (its per-request results are left out of the JSON)."""
    done = [r for r in record["results"] if r["error"] is None]
    tpots = [t for t in map(request_tpot, done) if t is not None]
    kinds: dict[str, int] = {}
    for transition in record["transitions"]:
        kinds[transition["kind"]] = kinds.get(transition["kind"], 0) + 1
    return {
        "policy": record["policy"], "requests": record["requests"], "completed": len(done),
        "ttft_ms": percentiles([r["ttft_s"] for r in done]), "tpot_ms": percentiles(tpots),
        "output_tok_s": record["summary"]["output_throughput"], "preemptions": record["summary"]["preemptions"],
        "transitions": kinds, "cycles": count_cycles(record["transitions"], window_s), "wall_s": record["wall_s"],
        "kv_demand": mean_demand(record),
    }


def attain(runs: list[dict], records: list[dict], factor: int) -> None:
    """SLO attainment of each run, against SLOs of `factor` times the best baseline's P50
    TTFT and P50 TPOT (the paper's relative SLOs)."""
    baselines = [run for run in runs if run["policy"] not in OURS]
    if not baselines:
        return
    slo_ttft = factor * min(run["ttft_ms"]["p50"] for run in baselines) / MS_PER_S
    slo_tpot = factor * min(run["tpot_ms"]["p50"] for run in baselines) / MS_PER_S
    for run, record in zip(runs, records):
        done = [r for r in record["results"] if r["error"] is None]
        met = [r["ttft_s"] <= slo_ttft and (request_tpot(r) or 0.0) <= slo_tpot for r in done]
        run["slo"] = {"ttft_ms": slo_ttft * MS_PER_S, "tpot_ms": slo_tpot * MS_PER_S,
                      "attainment": float(np.mean(met)) if met else None}


def compare(runs: list[dict]) -> dict | None:
    """kunserve against the best baseline: P99 TTFT ratio (baseline / kunserve) and P50 TPOT
    ratio (kunserve / baseline)."""
    ours = next((run for run in runs if run["policy"] == KUNSERVE), None)
    baselines = [run for run in runs if run["policy"] not in OURS]
    if ours is None or not baselines:
        return None
    best = min(baselines, key=lambda run: run["ttft_ms"]["p99"])
    best_tpot = min(run["tpot_ms"]["p50"] for run in baselines)
    return {"best_baseline": best["policy"], "p99_ttft_ratio": best["ttft_ms"]["p99"] / ours["ttft_ms"]["p99"],
            "p50_tpot_ratio": ours["tpot_ms"]["p50"] / best_tpot}


# ---- figures --------------------------------------------------------------------------------


def scenario_runs(setup: Setup, workload: Workload, policies: tuple[str, ...], cost_profile: str | None,
                  calibration: Calibration, load: float = 1.0) -> list[Run | dict]:
    """The runs of every policy on one setup and workload at `load` times the calibrated load:
    the calibration's own recompute record where it is one of them."""
    scale = None if calibration.rate_scale is None else calibration.rate_scale * load
    return [calibration.recompute if policy == "recompute" and load == 1.0
            else Run(setup, workload, scale, policy, cost_profile)
            for policy in policies if policy != STATIC_PIPELINE or setup.gpus % 2 == 0]


def run_scenarios(scenarios: list[list[Run | dict]]) -> list[list[dict]]:
    """Every scenario's records, all their runs made at once (in parallel with --jobs)."""
    pending = [item for runs in scenarios for item in runs if isinstance(item, Run)]
    made = iter(run_all(pending))
    return [[next(made) if isinstance(item, Run) else item for item in runs] for runs in scenarios]


def scenario(setup: Setup, workload: Workload, calibration: Calibration, records: list[dict],
             load: float = 1.0) -> dict:
    """One setup and workload's figures from its policies' records at `load`."""
    scale = None if calibration.rate_scale is None else calibration.rate_scale * load
    runs = [summarize(record, workload.duration_s) for record in records]
    attain(runs, records, workload.slo_factor)
    for run in runs:
        print(f"  {setup.label} / {workload.name} x{scale or 1:.2f}: {run['policy']:<9} TTFT P50/P99 "
              f"{run['ttft_ms']['p50']:>8.0f}/{run['ttft_ms']['p99']:>8.0f} ms, TPOT P50 {run['tpot_ms']['p50']:>6.1f} "
              f"ms, {run['transitions']} ({run['wall_s']:.0f} s)", flush=True)
    return {"setup": dataclasses.asdict(setup), "workload": dataclasses.asdict(workload), "rate_scale": scale,
            "calibrated_demand": calibration.demand, "load": load, "runs": runs, "comparison": compare(runs)}


def e2e(the_plan: Plan, profiles: dict[str, str | None]) -> list[dict]:
    calibrations = calibrate_all(the_plan.e2e, the_plan.calibration_rounds, profiles)
    records = run_scenarios([scenario_runs(setup, workload, POLICIES, profiles.get(setup.model), calibration)
                             for (setup, workload), calibration in zip(the_plan.e2e, calibrations)])
    return [scenario(setup, workload, calibration, scenario_records)
            for (setup, workload), calibration, scenario_records in zip(the_plan.e2e, calibrations, records)]


def scenario_name(setup: Setup, workload: Workload) -> str:
    memory = "h200" if setup.memory_gib is None else f"{setup.memory_gib:g}gib"
    return f"{setup.model}/{setup.gpus}gpu/{memory}/{workload.name}"


def ablation(the_plan: Plan, profiles: dict[str, str | None]) -> dict:
    setup, workload = the_plan.ablation
    profile = profiles.get(setup.model)
    calibration = calibrate(setup, workload, the_plan.calibration_rounds, profile)
    variants = {
        "drop, KV moved at the first version's NCCL rate": {"lookahead_batching": False,
                                                             "sim_device_port_bytes_s": FIRST_VERSION_EXCHANGE_BYTES_S},
        "+ coordinated KV exchange": {"lookahead_batching": False},
        "+ lookahead batching (kunserve)": {},
        "never restore": {"restore_after_s": math.inf},
    }
    runs = [summarize(calibration.recompute, workload.duration_s)]
    records = run_all([Run(setup, workload, calibration.rate_scale, KUNSERVE, profile, overrides)
                       for overrides in variants.values()])
    for name, record in zip(variants, records):
        run = summarize(record, workload.duration_s)
        run["variant"] = name
        runs.append(run)
        print(f"  ablation: {name:<50} TTFT P99 {run['ttft_ms']['p99']:>8.0f} ms, TPOT P50 "
              f"{run['tpot_ms']['p50']:.1f} ms", flush=True)
    return {"setup": dataclasses.asdict(setup), "workload": dataclasses.asdict(workload),
            "rate_scale": calibration.rate_scale, "calibrated_demand": calibration.demand, "runs": runs}


def sweep(the_plan: Plan, profiles: dict[str, str | None]) -> dict:
    setup, workload = the_plan.sweep
    profile = profiles.get(setup.model)
    calibration = calibrate(setup, workload, the_plan.calibration_rounds, profile)
    records = run_scenarios([scenario_runs(setup, workload, the_plan.sweep_policies, profile, calibration, load)
                             for load in the_plan.sweep_loads])
    points = [scenario(setup, workload, calibration, load_records, load)
              for load, load_records in zip(the_plan.sweep_loads, records)]
    return {"setup": dataclasses.asdict(setup), "workload": dataclasses.asdict(workload),
            "rate_scale": calibration.rate_scale, "calibrated_demand": calibration.demand, "points": points}


def graphed_stage_bound() -> float:
    """The median group/replica cycle ratio of GRAPHED_STAGE_BOUND's rows."""
    rows = json.loads(GRAPHED_STAGE_BOUND.read_text())["rows"]
    return float(np.median([row["ratio_lower_bound"] for row in rows]))


def group_factor(the_plan: Plan, profiles: dict[str, str | None]) -> dict:
    setup, workload = the_plan.group_factor
    profile = profiles.get(setup.model)
    calibration = calibrate(setup, workload, the_plan.calibration_rounds, profile)
    measured = json.loads(GROUP_STAGE_PROFILE.read_text())["group_stage_factor"]
    bound = graphed_stage_bound()
    factors = sorted([(factor, f"{factor:.2f}") for factor in GROUP_FACTORS]
                     + [(measured, f"{measured:.2f} (measured, eager stages, 2x H200)"),
                        (bound, f"{bound:.2f} (graphed-stage lower bound, 1x H200)")])
    runs = []
    records = run_all([Run(setup, workload, calibration.rate_scale, KUNSERVE, profile,
                           {"sim_group_stage_factor": factor}) for factor, _ in factors])
    for (_, label), record in zip(factors, records):
        run = summarize(record, workload.duration_s)
        run["group_stage_factor"] = label
        runs.append(run)
    return {"setup": dataclasses.asdict(setup), "workload": dataclasses.asdict(workload),
            "rate_scale": calibration.rate_scale, "calibrated_demand": calibration.demand, "runs": runs}


# ---- tables and plots -----------------------------------------------------------------------


def ms_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def run_cells(run: dict) -> list[str]:
    ttft, tpot = run["ttft_ms"], run["tpot_ms"]
    slo = run.get("slo", {}).get("attainment")
    transitions = ", ".join(f"{k} {v}" for k, v in run["transitions"].items()) or "-"
    return [*(ms_text(ttft[f"p{q:g}"]) for q in PERCENTILES), *(ms_text(tpot[f"p{q:g}"]) for q in PERCENTILES),
            f"{run['output_tok_s']:.0f}", "-" if slo is None else f"{slo * 100:.1f}", str(run["preemptions"]),
            transitions, str(run["cycles"])]


RUN_COLUMNS = ["TTFT P50", "P90", "P99", "P99.9", "TPOT P50", "P90", "P99", "P99.9", "out tok/s", "SLO %",
               "preempt", "transitions", "cycles"]


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def e2e_table(scenarios: list[dict]) -> str:
    rows = []
    for s in scenarios:
        label = f"{Setup(**s['setup']).label} / {s['workload']['name']}"
        for run in s["runs"]:
            rows.append([label, run["policy"], *run_cells(run)])
            label = ""
        c = s["comparison"]
        if c is not None:
            verdict = (f"**{c['p99_ttft_ratio']:.2f}x** P99 TTFT vs {c['best_baseline']}; P50 TPOT "
                       f"{c['p50_tpot_ratio']:.2f}x")
            rows.append(["", verdict, *[""] * len(RUN_COLUMNS)])
    return table(["setup / workload", "policy", *RUN_COLUMNS], rows)


def variants_table(figure: dict, key: str) -> str:
    rows = [[str(run.get(key, run["policy"])), *run_cells(run)] for run in figure["runs"]]
    return table([key.replace("_", " "), *RUN_COLUMNS], rows)


def sweep_table(figure: dict) -> str:
    policies = [run["policy"] for run in figure["points"][0]["runs"]]
    rows = [[f"{point['load']:g}x", *(ms_text(run["ttft_ms"]["p99"]) for run in point["runs"])]
            for point in figure["points"]]
    return table(["load", *(f"{p} P99 TTFT (ms)" for p in policies)], rows)


def plot_sweep(figure: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    policies = [run["policy"] for run in figure["points"][0]["runs"]]
    for i, policy in enumerate(policies):
        ax.plot([p["load"] for p in figure["points"]], [p["runs"][i]["ttft_ms"]["p99"] for p in figure["points"]],
                marker="o", label=policy)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("load (x the calibrated)")
    ax.set_ylabel("P99 TTFT (ms)")
    ax.set_title(f"{Setup(**figure['setup']).label} / {figure['workload']['name']} (simulated)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_e2e(scenarios: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(scenarios)), 4))
    width = 0.8 / len(POLICIES)
    for i, policy in enumerate(POLICIES):
        values = [next((run["ttft_ms"]["p99"] for run in s["runs"] if run["policy"] == policy), np.nan)
                  for s in scenarios]
        ax.bar(np.arange(len(scenarios)) + i * width, values, width, label=policy)
    ax.set_xticks(np.arange(len(scenarios)) + width * (len(POLICIES) - 1) / 2)
    ax.set_xticklabels([f"{s['setup']['model']}\n{s['setup']['gpus']} GPUs\n{s['workload']['name']}"
                        for s in scenarios], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("P99 TTFT (ms)")
    ax.set_title("P99 TTFT per policy (simulated)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def derived_profiles(out_dir: Path) -> dict[str, str | None]:
    """Cost profiles for models without a measured one: Qwen2.5-14B's, scaled from the
    measured Qwen2.5-32B profile (same attention and vocabulary; the layers' weight-reading
    and per-token terms scale with the layer's size). Estimated, not measured."""
    measured = CostModel.load(Path(__file__).resolve().parents[1] / "kunserve/engine/profiles/qwen2.5-32b.json")
    spec = resolve_model("qwen2.5-14b").spec
    layer_bytes = CostModel.default(spec, "qwen2.5-14b").layer_bytes
    ratio = layer_bytes / measured.layer_bytes
    step = dataclasses.replace(measured.step, layer_s=measured.step.layer_s * ratio,
                               layer_token_s=measured.step.layer_token_s * ratio)
    derived = dataclasses.replace(measured, model="qwen2.5-14b", step=step, layer_bytes=layer_bytes, notes={
        **measured.notes, "source": f"scaled from the measured qwen2.5-32b profile by layer bytes ({ratio:.3f}): "
                                    "benchmarks/paper.py derived_profiles; not measured"})
    path = out_dir / "qwen2.5-14b_derived_profile.json"
    derived.save(path)
    return {"qwen2.5-14b": str(path)}


def configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING)
    logger.setLevel(logging.INFO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run of every figure (CPU, minutes)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--figures", nargs="+", default=["e2e", "ablation", "sweep", "group_factor"],
                        choices=["e2e", "ablation", "sweep", "group_factor"])
    parser.add_argument("--scenarios", nargs="+", default=None, metavar="SUBSTRING",
                        help="e2e: only the scenarios whose name (model/Ngpu/memory/workload, e.g. "
                             "llama-3-8b/2gpu/44gib/reasoning) contains one of these (to split the full run)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes for independent runs (a scenario's policies, the sweep's points); the "
                             "calibrations stay serial. The figures do not depend on it")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    configure_logging()
    for trace in (CODE_TRACE, CONV_TRACE):
        if not Path(trace).is_file():
            raise SystemExit(f"{trace}: not found; run from the repository root (the traces are in data/traces/)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    the_plan = plan(args.quick)
    if args.scenarios is not None:
        kept = [(setup, w) for setup, w in the_plan.e2e if any(part in scenario_name(setup, w)
                                                                 for part in args.scenarios)]
        the_plan = dataclasses.replace(the_plan, e2e=kept)
    profiles = derived_profiles(args.out_dir)
    start_pool(args.jobs)
    start = time.perf_counter()
    figures: dict = {}
    builders = {"e2e": e2e, "ablation": ablation, "sweep": sweep, "group_factor": group_factor}
    for name in args.figures:
        print(f"== {name}", flush=True)
        figures[name] = builders[name](the_plan, profiles)
    tables = []
    if "e2e" in figures:
        tables += ["## e2e", e2e_table(figures["e2e"])]
        plot_e2e(figures["e2e"], args.out_dir / "e2e_p99_ttft.png")
    if "ablation" in figures:
        tables += ["## ablation", variants_table(figures["ablation"], "variant")]
    if "sweep" in figures:
        tables += ["## sweep", sweep_table(figures["sweep"])]
        plot_sweep(figures["sweep"], args.out_dir / "sweep_p99_ttft.png")
    if "group_factor" in figures:
        tables += ["## group_factor", variants_table(figures["group_factor"], "group_stage_factor")]
    text = "\n\n".join(tables) + "\n"
    print(text)
    (args.out_dir / "tables.md").write_text(text)
    (args.out_dir / "paper.json").write_text(json.dumps({"quick": args.quick, "figures": figures,
                                                         "wall_s": time.perf_counter() - start}, indent=1))
    print(f"wrote {args.out_dir} in {time.perf_counter() - start:.0f} s")
    stop_pool()


if __name__ == "__main__":
    main()
