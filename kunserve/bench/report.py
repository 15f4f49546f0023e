"""Benchmark figures from request results, the server's own histograms over the same run, and a text table.

Latencies are reported in milliseconds. TPOT of a request is (e2e - ttft) / (output tokens - 1),
defined only for requests with more than one output token. The server block puts the bench's
counts next to the deltas of the server's Prometheus histograms, so a disagreement (a token
the client never saw, a request the server never counted) shows up at a glance.
"""

from __future__ import annotations

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from kunserve.bench.client import RequestResult

MS_PER_S = 1000.0
PERCENT = 100.0
PERCENTILES = (50, 90, 99)
METRICS_PATH = "/metrics"
METRICS_TIMEOUT_S = 10.0

# bench latency -> the server histogram measuring the same thing
SERVER_HISTOGRAMS = {
    "ttft": "vllm:time_to_first_token_seconds",
    "itl": "vllm:inter_token_latency_seconds",
    "tpot": "vllm:request_time_per_output_token_seconds",
    "e2e": "vllm:e2e_request_latency_seconds",
    "queue": "vllm:request_queue_time_seconds",
}
# bench token total -> the server counter (sample name; the parser drops `_total` from family names only)
SERVER_COUNTERS = {
    "prompt_tokens": "vllm:prompt_tokens_total",
    "output_tokens": "vllm:generation_tokens_total",
}
LATENCIES = ("ttft", "tpot", "itl", "e2e")


def latency_stats(values_s: list[float]) -> dict:
    """count, mean and percentiles in milliseconds (None when there are no values)."""
    stats: dict = {"count": len(values_s)}
    values_ms = np.asarray(values_s, dtype=float) * MS_PER_S
    empty = len(values_s) == 0
    stats["mean"] = None if empty else float(values_ms.mean())
    for q in PERCENTILES:
        stats[f"p{q}"] = None if empty else float(np.percentile(values_ms, q))
    return stats


def request_tpot_s(result: RequestResult) -> float | None:
    if result.ttft_s is None or result.output_tokens <= 1:
        return None
    return (result.e2e_s - result.ttft_s) / (result.output_tokens - 1)


def meets_slo(result: RequestResult, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
    """A request with a single output token has no TPOT and meets any TPOT SLO."""
    if slo_ttft_s is not None and (result.ttft_s is None or result.ttft_s > slo_ttft_s):
        return False
    tpot = request_tpot_s(result)
    return slo_tpot_s is None or tpot is None or tpot <= slo_tpot_s


def summarize(
    results: list[RequestResult], duration_s: float, *, slo_ttft_s: float | None, slo_tpot_s: float | None
) -> dict:
    """Counts, latency statistics, throughput, token totals and SLO attainment of completed requests."""
    done = [r for r in results if r.error is None]
    tpots = [t for t in map(request_tpot_s, done) if t is not None]
    prompt_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    slo_set = slo_ttft_s is not None or slo_tpot_s is not None
    attainment = None
    if slo_set and done:
        attainment = sum(meets_slo(r, slo_ttft_s, slo_tpot_s) for r in done) / len(done)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration_s,
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration_s,
        "ttft_ms": latency_stats([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": latency_stats(tpots),
        "itl_ms": latency_stats([gap for r in done for gap in r.itls_s]),
        "e2e_ms": latency_stats([r.e2e_s for r in done]),
        "slo_ttft_ms": None if slo_ttft_s is None else slo_ttft_s * MS_PER_S,
        "slo_tpot_ms": None if slo_tpot_s is None else slo_tpot_s * MS_PER_S,
        "slo_attainment": attainment,
    }


def scrape_histograms(base_url: str, api_key: str | None = None) -> dict[str, dict]:
    """Counts and sums of the server's latency histograms and its token counters, summed over
    label sets: {histogram: {"count", "sum"}, counter: {"value"}}; absent metrics are left out.
    Raises httpx.HTTPError when /metrics cannot be fetched."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key is not None else {}
    response = httpx.get(base_url.rstrip("/") + METRICS_PATH, headers=headers, timeout=METRICS_TIMEOUT_S)
    response.raise_for_status()
    return parse_metrics(response.text)


def parse_metrics(text: str) -> dict[str, dict]:
    """The part of `scrape_histograms` that reads Prometheus text exposition."""
    histograms = set(SERVER_HISTOGRAMS.values())
    counters = set(SERVER_COUNTERS.values())
    found: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            base, _, suffix = sample.name.rpartition("_")
            if base in histograms and suffix in ("count", "sum"):
                entry = found.setdefault(base, {"count": 0.0, "sum": 0.0})
                entry[suffix] += sample.value
            elif sample.name in counters:
                entry = found.setdefault(sample.name, {"value": 0.0})
                entry["value"] += sample.value
    return found


def server_delta(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """What the server recorded between two scrapes; histograms also get their mean in ms."""
    delta: dict[str, dict] = {}
    for name, now in after.items():
        then = before.get(name, {})
        diff = {key: value - then.get(key, 0.0) for key, value in now.items()}
        if "count" in diff:
            diff["mean_ms"] = diff["sum"] / diff["count"] * MS_PER_S if diff["count"] else None
        delta[name] = diff
    return delta


def format_table(summary: dict) -> str:
    """Every figure of `summary` as aligned plain text; a server block when the summary has one."""
    attainment = summary["slo_attainment"]
    overview = [
        ["completed requests", str(summary["completed"])],
        ["failed requests", str(summary["failed"])],
        ["duration (s)", _num(summary["duration_s"])],
        ["request throughput (req/s)", _num(summary["request_throughput"])],
        ["output throughput (tok/s)", _num(summary["output_throughput"])],
        ["total token throughput (tok/s)", _num(summary["total_token_throughput"])],
        ["total prompt tokens", str(summary["total_prompt_tokens"])],
        ["total output tokens", str(summary["total_output_tokens"])],
        ["SLO TTFT (ms)", _num(summary["slo_ttft_ms"])],
        ["SLO TPOT (ms)", _num(summary["slo_tpot_ms"])],
        ["SLO attainment (%)", _num(None if attainment is None else attainment * PERCENT)],
    ]
    stat_keys = ["count", "mean"] + [f"p{q}" for q in PERCENTILES]
    latencies = [["latency (ms)", *stat_keys]]
    for name in LATENCIES:
        stats = summary[f"{name}_ms"]
        latencies.append([name, *(_num(stats[key]) for key in stat_keys)])
    blocks = [_align(overview), _align(latencies)]
    if summary.get("server") is not None:
        blocks.append(_align(_server_rows(summary), left_columns=2))
    return "\n\n".join(blocks)


def _server_rows(summary: dict) -> list[list[str]]:
    server = summary["server"]
    rows = [["bench vs server", "server metric", "bench count", "server count", "bench mean ms", "server mean ms"]]
    for name, metric in SERVER_HISTOGRAMS.items():
        seen = server.get(metric)
        bench = summary.get(f"{name}_ms")
        rows.append(
            [
                name,
                metric,
                "-" if bench is None else str(bench["count"]),
                "-" if seen is None else _num(seen["count"]),
                "-" if bench is None else _num(bench["mean"]),
                "-" if seen is None else _num(seen["mean_ms"]),
            ]
        )
    for name, metric in SERVER_COUNTERS.items():
        seen = server.get(metric)
        rows.append([name, metric, str(summary[f"total_{name}"]), "-" if seen is None else _num(seen["value"]), "", ""])
    return rows


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.2f}"


def _align(rows: list[list[str]], left_columns: int = 1) -> str:
    """Text columns left-aligned, number columns right-aligned, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if i < left_columns else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
