"""The benchmark as a command: build a workload, replay it against a server, report. For example:

python -m kunserve.bench.run --trace data/traces/azure_llm_conv_2023.csv --time-scale 0.5 --out $OUT/bench.json
python -m kunserve.bench.run --num-prompts 200 --request-rate 8 --arrival gamma --cv 4 --slo-ttft-ms 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np

from kunserve.bench.client import run_requests
from kunserve.bench.failures import explain_failures
from kunserve.bench.report import MS_PER_S, format_table, scrape_histograms, server_delta, summarize
from kunserve.bench.workload import (
    DATASETS,
    RequestSpec,
    dataset_workload,
    load_trace,
    prompt_token_ids,
    synthetic_workload,
)
from kunserve.logs import DEFAULT_LOG_LEVEL, LOG_LEVELS, configure

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_NUM_PROMPTS = 100
DEFAULT_INPUT_LEN = 128
DEFAULT_OUTPUT_LEN = 64
# Ids below 256 are byte tokens in every byte-level BPE vocabulary, so any such model accepts them.
DEFAULT_MAX_PROMPT_TOKEN_ID = 256
DEFAULT_TIMEOUT_S = 600.0
HEALTH_PATH = "/health"
REACH_TIMEOUT_S = 10.0  # how long the check that a server is there waits for an answer
POISSON_CV = 1.0


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="server address (default %(default)s)")
    parser.add_argument(
        "--model",
        default=None,
        help="model name to send (default: the server's default); with --launch: the model directory or preset "
        "to serve (default: the embedded tiny-llama)",
    )
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight (default none)")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help="per-request connect/read timeout")
    add_workload_arguments(parser)


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """What is sent and when, the SLOs, and where results go: shared by `kunserve bench` and
    `kunserve simulate`."""
    parser.add_argument("--trace", default=None, help="replay this Azure LLM trace CSV instead of a synthetic workload")
    parser.add_argument(
        "--time-scale", type=float, default=None, help="trace: multiply arrival offsets (0.5: twice as fast)"
    )
    parser.add_argument(
        "--rate-scale",
        type=float,
        default=None,
        help="trace: F times its rate, bursts kept (each arrival: ceil(F) copies, each kept with prob. F/ceil(F))",
    )
    parser.add_argument(
        "--trace-start-s", type=float, default=None, help="trace: replay from this recorded offset (s)"
    )
    parser.add_argument(
        "--trace-duration-s", type=float, default=None, help="trace: replay this much recorded time (s)"
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="mean req/s; trace: rescale arrivals to it (default: as recorded); synthetic: default inf, all at once",
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help=f"trace: first N rows (default all); synthetic: N requests (default {DEFAULT_NUM_PROMPTS})",
    )
    parser.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson", help="synthetic arrival process")
    parser.add_argument("--cv", type=float, default=POISSON_CV, help="gamma arrivals' gap coefficient of variation")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                        help="synthetic: prompt and output lengths drawn like this set's (instead of --input-len and "
                             "--output-len); with --trace: the trace's arrivals, this set's lengths")
    parser.add_argument("--input-len", type=int, default=DEFAULT_INPUT_LEN, help="synthetic prompt length in tokens")
    parser.add_argument("--output-len", type=int, default=DEFAULT_OUTPUT_LEN, help="synthetic output length in tokens")
    parser.add_argument(
        "--max-prompt-token-id",
        type=int,
        default=DEFAULT_MAX_PROMPT_TOKEN_ID,
        help="prompt token ids are drawn from [0, this) (default %(default)s: byte tokens of byte-level vocabularies)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT SLO for attainment")
    parser.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT SLO for attainment")
    parser.add_argument("--out", default=None, help="write the summary, arguments and per-request results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_workload(args: argparse.Namespace) -> list[RequestSpec]:
    specs = _arrivals_and_lengths(args)
    dataset = getattr(args, "dataset", None)
    if dataset is None:
        return specs
    return dataset_workload(dataset, np.array([spec.arrival_s for spec in specs]), args.seed)


def _arrivals_and_lengths(args: argparse.Namespace) -> list[RequestSpec]:
    if args.trace is not None:
        return load_trace(
            args.trace,
            time_scale=args.time_scale,
            request_rate=args.request_rate,
            limit=args.num_prompts,
            start_s=args.trace_start_s,
            duration_s=args.trace_duration_s,
            rate_scale=args.rate_scale,
            seed=args.seed,
        )
    trace_only = {"--time-scale": args.time_scale, "--rate-scale": args.rate_scale,
                  "--trace-start-s": args.trace_start_s, "--trace-duration-s": args.trace_duration_s}
    given = [flag for flag, value in trace_only.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only with --trace")
    cv = POISSON_CV if args.arrival == "poisson" else args.cv
    if args.arrival == "poisson" and args.cv != POISSON_CV:
        logger.warning("--arrival poisson ignores --cv %s", args.cv)
    return synthetic_workload(
        DEFAULT_NUM_PROMPTS if args.num_prompts is None else args.num_prompts,
        math.inf if args.request_rate is None else args.request_rate,
        cv,
        args.input_len,
        args.output_len,
        args.seed,
    )


def run_bench(args: argparse.Namespace) -> dict:
    """Run the benchmark `args` describe; print the table, write --out, return the summary."""
    specs = build_workload(args)
    prompts = prompt_token_ids(specs, args.max_prompt_token_id, args.seed)
    logger.info(
        "%d requests over %.1f s, %d prompt tokens, %d output tokens requested",
        len(specs),
        specs[-1].arrival_s,
        sum(s.prompt_len for s in specs),
        sum(s.output_len for s in specs),
    )
    before = _try_scrape(args.base_url, args.api_key)
    results, duration = asyncio.run(
        run_requests(
            args.base_url,
            args.model,
            specs,
            prompts,
            api_key=args.api_key,
            max_concurrency=args.max_concurrency,
            timeout_s=args.timeout_s,
            show_progress=not args.no_progress,
        )
    )
    after = _try_scrape(args.base_url, args.api_key)
    log_failures([r.error for r in results], args.base_url, specs)
    summary = summarize(
        results,
        duration,
        slo_ttft_s=None if args.slo_ttft_ms is None else args.slo_ttft_ms / MS_PER_S,
        slo_tpot_s=None if args.slo_tpot_ms is None else args.slo_tpot_ms / MS_PER_S,
    )
    summary["server"] = None if before is None or after is None else server_delta(before, after)
    print(format_table(summary))
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"summary": summary, "args": json_args(args), "results": [asdict(r) for r in results]}
        out.write_text(json.dumps(record, indent=1))
        logger.info("wrote %s", out)
    return summary


def require_server(base_url: str) -> None:
    """Exit with what to do when nothing answers at `base_url` (any HTTP answer will do: the
    bench may target any OpenAI-compatible server)."""
    try:
        httpx.get(base_url.rstrip("/") + HEALTH_PATH, timeout=REACH_TIMEOUT_S)
    except (httpx.ConnectError, httpx.ConnectTimeout) as error:
        raise SystemExit(
            f"kunserve bench: no server answers at {base_url} ({type(error).__name__}: {error}). Start one "
            f"(`kunserve serve`) or point --base-url at one; `kunserve bench --launch` (or --demo) starts a "
            "cluster in this process instead."
        ) from None


def log_failures(errors: list[str | None], base_url: str | None, specs: list[RequestSpec]) -> None:
    """Warn how many requests failed, why, and what to do about it (see failures.py)."""
    longest = max((s.prompt_len + s.output_len for s in specs), default=0)
    lines = explain_failures(errors, base_url, longest)
    if lines:
        logger.warning("\n".join(lines))


def _try_scrape(base_url: str, api_key: str | None) -> dict[str, dict] | None:
    try:
        return scrape_histograms(base_url, api_key)
    except (httpx.HTTPError, ValueError) as exc:
        logger.warning("no server metrics from %s/metrics: %s", base_url.rstrip("/"), exc)
        return None


def json_args(args: argparse.Namespace) -> dict:
    """The arguments as strict JSON: no callables (a CLI's handler) and infinities as strings."""
    return {
        key: str(value) if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in vars(args).items()
        if not callable(value)
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kunserve.bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=DEFAULT_LOG_LEVEL, type=str.upper, choices=LOG_LEVELS)
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    configure(args.log_level)
    run_bench(args)


if __name__ == "__main__":
    main()
