"""Benchmark reports: statistics, SLO attainment, the server's metrics and the text table."""

from __future__ import annotations

import pytest

from kunserve.bench.client import RequestResult
from kunserve.bench.report import format_table, parse_metrics, server_delta, summarize

DURATION_S = 2.0
TTFT = "vllm:time_to_first_token_seconds"
E2E = "vllm:e2e_request_latency_seconds"
GENERATED = "vllm:generation_tokens_total"


def done(ttft_s: float, e2e_s: float, output_tokens: int, prompt_tokens: int, itl_s: float) -> RequestResult:
    return RequestResult(
        prompt_len=prompt_tokens,
        output_len=output_tokens,
        ttft_s=ttft_s,
        itls_s=[itl_s] * (output_tokens - 1),
        e2e_s=e2e_s,
        output_tokens=output_tokens,
        prompt_tokens=prompt_tokens,
    )


@pytest.fixture
def results() -> list[RequestResult]:
    return [
        done(0.1, 1.1, 11, 10, 0.1),  # tpot 100 ms
        done(0.2, 2.2, 11, 20, 0.2),  # tpot 200 ms
        done(0.3, 0.3, 1, 30, 0.0),  # one token: no tpot
        RequestResult(prompt_len=40, output_len=5, e2e_s=0.5, error="HTTP 500: boom"),
    ]


def test_summary_counts_latencies_and_throughput(results: list[RequestResult]) -> None:
    s = summarize(results, DURATION_S, slo_ttft_s=None, slo_tpot_s=None)
    assert (s["completed"], s["failed"]) == (3, 1)
    assert s["ttft_ms"] == pytest.approx({"count": 3, "mean": 200.0, "p50": 200.0, "p90": 280.0, "p99": 298.0})
    assert s["tpot_ms"]["count"] == 2
    assert s["tpot_ms"]["mean"] == pytest.approx(150.0)
    assert s["itl_ms"]["count"] == 20
    assert s["itl_ms"]["mean"] == pytest.approx(150.0)
    assert s["itl_ms"]["p50"] == pytest.approx(150.0)
    assert s["e2e_ms"]["mean"] == pytest.approx(1200.0)  # the failed request's 500 ms is excluded
    assert (s["total_prompt_tokens"], s["total_output_tokens"]) == (60, 23)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(11.5)
    assert s["total_token_throughput"] == pytest.approx(41.5)
    assert s["slo_attainment"] is None


def test_no_completed_requests_gives_empty_statistics() -> None:
    s = summarize([RequestResult(1, 1, error="x")], DURATION_S, slo_ttft_s=0.1, slo_tpot_s=None)
    assert s["ttft_ms"] == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    assert s["slo_attainment"] is None


@pytest.mark.parametrize(
    ("slo_ttft_s", "slo_tpot_s", "attainment"),
    [
        (0.25, 0.15, 1 / 3),  # first only: the second misses TPOT, the third TTFT
        (None, 0.15, 2 / 3),  # the one-token request meets any TPOT SLO
        (0.25, None, 2 / 3),
        (1.0, 1.0, 1.0),
    ],
)
def test_slo_attainment(
    results: list[RequestResult], slo_ttft_s: float | None, slo_tpot_s: float | None, attainment: float
) -> None:
    s = summarize(results, DURATION_S, slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s)
    assert s["slo_attainment"] == pytest.approx(attainment)


METRICS_TEXT = f"""\
# HELP {TTFT} Time to first token.
# TYPE {TTFT} histogram
{TTFT}_bucket{{le="0.1",model_name="a"}} 1.0
{TTFT}_bucket{{le="+Inf",model_name="a"}} 2.0
{TTFT}_count{{model_name="a"}} 2.0
{TTFT}_sum{{model_name="a"}} 0.3
{TTFT}_created{{model_name="a"}} 1.7e9
{TTFT}_bucket{{le="+Inf",model_name="b"}} 1.0
{TTFT}_count{{model_name="b"}} 1.0
{TTFT}_sum{{model_name="b"}} 0.6
# HELP {GENERATED} Generated tokens.
# TYPE {GENERATED} counter
{GENERATED}{{model_name="a"}} 40.0
{GENERATED}{{model_name="b"}} 2.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running 3.0
"""


def test_parse_metrics_sums_label_sets() -> None:
    found = parse_metrics(METRICS_TEXT)
    assert found == {TTFT: {"count": 3.0, "sum": pytest.approx(0.9)}, GENERATED: {"value": 42.0}}


def test_server_delta() -> None:
    before = {TTFT: {"count": 2.0, "sum": 0.5}, GENERATED: {"value": 100.0}, E2E: {"count": 4.0, "sum": 1.0}}
    after = {TTFT: {"count": 5.0, "sum": 1.1}, GENERATED: {"value": 130.0}, E2E: {"count": 4.0, "sum": 1.0}}
    delta = server_delta(before, after)
    assert delta[TTFT] == pytest.approx({"count": 3.0, "sum": 0.6, "mean_ms": 200.0})
    assert delta[GENERATED] == {"value": 30.0}
    assert delta[E2E] == {"count": 0.0, "sum": 0.0, "mean_ms": None}
    assert server_delta({}, after)[TTFT]["count"] == 5.0  # a metric first seen after the run started


def test_format_table_shows_every_figure(results: list[RequestResult]) -> None:
    summary = summarize(results, DURATION_S, slo_ttft_s=0.25, slo_tpot_s=0.15)
    summary["server"] = server_delta({}, parse_metrics(METRICS_TEXT))
    table = format_table(summary)
    for name in (
        "completed",
        "failed",
        "request throughput",
        "output throughput",
        "total token throughput",
        "prompt tokens",
        "output tokens",
        "SLO attainment",
        "ttft",
        "tpot",
        "itl",
        "e2e",
        "p50",
        "p90",
        "p99",
        TTFT,
        GENERATED,
        "vllm:prompt_tokens_total",
    ):
        assert name in table
    summary["server"] = None
    assert TTFT not in format_table(summary)
