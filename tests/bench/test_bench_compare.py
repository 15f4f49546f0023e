"""Policy comparison, SLOs from unloaded latency, and results from engine outputs: pure
functions on made-up runs, no cluster."""

from __future__ import annotations

import argparse

import pytest

from kunserve.bench.client import RequestResult
from kunserve.bench.compare import comparison_table, transition_stats, ttft_p99_ratio
from kunserve.bench.in_process import result_from_output
from kunserve.bench.launch import add_launch_arguments, policies_of, rounded
from kunserve.bench.run import add_bench_arguments
from kunserve.bench.slo import (
    SLO_TPOT_FACTOR,
    SLO_TTFT_FACTOR,
    UnloadedReference,
    derive_slo,
    reference_shape,
    unloaded_reference,
)
from kunserve.bench.workload import RequestSpec
from kunserve.cli import main
from kunserve.cluster.policies.registry import OVERLOAD_POLICIES
from kunserve.outputs import CompletionOutput, RequestMetrics, RequestOutput


def transition(kind: str, duration_s: float) -> dict:
    return {"kind": kind, "members": [0, 1], "duration_s": duration_s, "exchange_s": 0.0, "start_s": 1.0,
            "end_s": 1.0 + duration_s, "reason": "test"}


def stats(p50: float, p99: float) -> dict:
    return {"count": 10, "mean": p50, "p50": p50, "p90": p99, "p99": p99}


def run(policy: str, ttft_p99_ms: float, transitions: list[dict] | None = None) -> dict:
    summary = {
        "completed": 10, "failed": 0, "ttft_ms": stats(10.0, ttft_p99_ms), "tpot_ms": stats(2.0, 3.0),
        "e2e_ms": stats(50.0, 90.0), "output_throughput": 123.4, "slo_attainment": 0.5, "slo_ttft_ms": 20.0,
        "slo_tpot_ms": 3.0, "preemptions": 7, "swap_outs": 0,
    }  # fmt: skip
    return {"policy": policy, "summary": summary, "transitions": transitions or []}


def table_row(table: str, policy: str) -> list[str]:
    row = next(line for line in table.splitlines() if line.startswith(f"| {policy} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_transition_stats_count_and_average_each_kind() -> None:
    found = transition_stats([transition("drop", 0.2), transition("restore", 0.1), transition("drop", 0.4)])
    assert found == {"drop": {"count": 2, "mean_duration_s": pytest.approx(0.3)},
                     "restore": {"count": 1, "mean_duration_s": pytest.approx(0.1)}}


def test_kinds_other_than_drop_and_restore_are_listed_generically() -> None:
    table = comparison_table([run("migrate", 100.0, [transition("migrate", 0.05), transition("migrate", 0.15)])])
    assert table_row(table, "migrate")[-3:] == ["0", "0", "migrate: 2 (0.100)"]


def test_drops_and_restores_have_their_own_columns() -> None:
    table = comparison_table([run("kunserve", 10.0, [transition("drop", 0.2), transition("restore", 0.1)])])
    assert table_row(table, "kunserve")[-3:] == ["1 (0.200)", "1 (0.100)", "-"]


def test_ratio_is_the_best_baselines_p99_ttft_over_kunserves() -> None:
    ratio = ttft_p99_ratio([run("recompute", 400.0), run("swap", 300.0), run("kunserve", 100.0)])
    assert ratio == {"baseline": "swap", "baseline_p99_ms": 300.0, "kunserve_p99_ms": 100.0, "ratio": 3.0}
    assert "best baseline (swap) / kunserve: 3.00x" in comparison_table(
        [run("recompute", 400.0), run("swap", 300.0), run("kunserve", 100.0)]
    )


def test_a_kunserve_variant_is_no_baseline() -> None:
    ratio = ttft_p99_ratio([run("swap", 300.0), run("kunserve-swap", 50.0), run("kunserve", 100.0)])
    assert ratio is not None and ratio["baseline"] == "swap"


@pytest.mark.parametrize("policies", [("recompute", "swap"), ("kunserve",)])
def test_no_ratio_without_both_kunserve_and_a_baseline(policies: tuple[str, ...]) -> None:
    runs = [run(p, 100.0) for p in policies]
    assert ttft_p99_ratio(runs) is None
    assert "best baseline" not in comparison_table(runs)


def test_a_table_row_shows_the_policy_figures() -> None:
    row = table_row(comparison_table([run("recompute", 400.0)]), "recompute")
    assert row[:13] == ["recompute", "10", "0", "10.0", "400.0", "2.0", "3.0", "90.0", "123.4", "50.0",
                        "20.0 / 3.0", "7", "0"]


def test_a_table_row_says_how_many_preemptions_swapped_out() -> None:
    swapping = run("auto", 400.0)
    swapping["summary"]["swap_outs"] = 5
    assert table_row(comparison_table([swapping]), "auto")[11] == "7 (5 swapped)"


def test_slos_scale_the_unloaded_latency() -> None:
    slo = derive_slo(UnloadedReference(8, 4, 3, ttft_s=0.01, tpot_s=0.002))
    assert (slo.ttft_s, slo.tpot_s) == pytest.approx((0.01 * SLO_TTFT_FACTOR, 0.002 * SLO_TPOT_FACTOR))


def test_an_explicit_slo_overrides_its_own_only() -> None:
    slo = derive_slo(UnloadedReference(8, 4, 3, ttft_s=0.01, tpot_s=0.002), ttft_ms=250.0)
    assert (slo.ttft_s, slo.tpot_s) == pytest.approx((0.25, 0.002 * SLO_TPOT_FACTOR))


def test_no_tpot_slo_for_one_token_outputs() -> None:
    results = [RequestResult(8, 1, ttft_s=0.01, e2e_s=0.01, output_tokens=1)]
    reference = unloaded_reference(results, 8, 1)
    assert (reference.ttft_s, reference.tpot_s) == (pytest.approx(0.01), None)
    assert derive_slo(reference).tpot_s is None


def test_the_reference_shape_is_the_median_request() -> None:
    specs = [RequestSpec(0.0, p, o) for p, o in ((10, 1), (30, 5), (500, 9))]
    assert reference_shape(specs) == (30, 5)


def output(finish_reason: str = "length", error: str | None = None) -> RequestOutput:
    metrics = RequestMetrics(arrival_time=100.0, first_scheduled_time=100.5, first_token_time=101.0,
                             last_token_time=102.0, finished_time=102.0, num_preemptions=2, num_swap_outs=1)
    completion = CompletionOutput(0, "", [5, 6, 7], finish_reason)
    return RequestOutput("r", None, [1, 2], [completion], True, metrics, error)


def test_a_result_takes_its_latencies_from_the_engine_metrics() -> None:
    result = result_from_output(output(), prompt_len=2, output_len=3, sent_at=0.0)
    assert (result.queue_s, result.ttft_s, result.e2e_s) == (0.5, 1.0, 2.0)
    assert (result.prompt_tokens, result.output_tokens, result.num_preemptions, result.itls_s) == (2, 3, 2, [])
    assert result.num_swap_outs == 1
    assert result.error is None


def test_an_aborted_or_failed_output_is_a_failed_request() -> None:
    assert result_from_output(output(finish_reason="abort"), 2, 3, 0.0).error is not None
    assert result_from_output(output(error="worker died"), 2, 3, 0.0).error == "worker died"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    add_launch_arguments(parser)
    return parser.parse_args(list(argv))


def test_policies_are_every_overload_policy_the_coordinator_knows() -> None:
    assert policies_of(parse("--compare", *OVERLOAD_POLICIES)) == list(OVERLOAD_POLICIES)
    assert policies_of(parse("--overload-policy", "recompute")) == ["recompute"]


def test_a_policy_compared_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="each policy once"):
        policies_of(parse("--compare", "recompute", "recompute"))


def test_an_unknown_policy_is_refused_by_the_parser() -> None:
    with pytest.raises(SystemExit):
        parse("--compare", "no-such-policy")


def test_compare_needs_launch() -> None:
    with pytest.raises(SystemExit, match="need --launch"):
        main(["bench", "--compare", "recompute", "kunserve"])


def test_results_json_keeps_nine_significant_digits_at_any_depth() -> None:
    assert rounded({"runs": [{"ttft_s": 0.00552445661234, "n": 3, "p99": [1234.5678901234]}]}) == {
        "runs": [{"ttft_s": 0.00552445661, "n": 3, "p99": [1234.56789]}]}
