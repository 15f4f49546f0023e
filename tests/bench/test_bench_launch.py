"""`kunserve bench --launch --compare`: the same burst on two tiny KV-starved replicas under
each policy, one cluster after the other, with results.json, table.md and plots written.

One run (module fixture) is shared by the tests; each checks one property of it."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import matplotlib.image
import pytest

from kunserve.bench.slo import SLO_TPOT_FACTOR, SLO_TTFT_FACTOR
from kunserve.cli import main

pytestmark = pytest.mark.slow  # clusters launched per policy, workloads replayed

POLICIES = ("recompute", "kunserve")
NUM_REQUESTS = 16
PROMPT_LEN = 40
OUTPUT_LEN = 40
# run_burst's overload (tests/cluster/test_live_drop.py): 12 blocks (192 tokens) per replica hold 2 of these requests.
ENGINE_FLAGS = ("--num-kv-blocks", "12", "--max-num-seqs", "16", "--max-num-batched-tokens", "64",
                "--worker-threads", "1", "--max-model-len", "192")  # fmt: skip
COORDINATOR_FLAGS = ("--check-interval-s", "0.01", "--drop-after-s", "0.02", "--restore-after-s", "0.2")
TIMELINE_INTERVAL_S = 0.02
TIMEOUT_S = 60  # a request not done by then has been lost


@pytest.fixture(scope="module")
def run(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The output directory and what the command printed."""
    out_dir = tmp_path_factory.mktemp("launch")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main([
            "bench", "--launch", "--compare", *POLICIES, "--model", str(llama_dir), "--replicas", "2",
            "--dispatch-policy", "round_robin", *ENGINE_FLAGS, *COORDINATOR_FLAGS,
            "--num-prompts", str(NUM_REQUESTS), "--input-len", str(PROMPT_LEN), "--output-len", str(OUTPUT_LEN),
            "--timeline-interval-s", str(TIMELINE_INTERVAL_S), "--timeout-s", str(TIMEOUT_S), "--no-progress",
            "--out-dir", str(out_dir),
        ])  # fmt: skip
    return out_dir, printed.getvalue()


@pytest.fixture(scope="module")
def runs(run: tuple[Path, str]) -> dict[str, dict]:
    record = json.loads((run[0] / "results.json").read_text())
    return {r["policy"]: r for r in record["runs"]}


def test_each_policy_ran_once_in_order(run: tuple[Path, str]) -> None:
    record = json.loads((run[0] / "results.json").read_text())
    assert [r["policy"] for r in record["runs"]] == list(POLICIES)


def test_every_request_completes_with_its_tokens(runs: dict[str, dict]) -> None:
    for policy in POLICIES:
        summary = runs[policy]["summary"]
        assert (summary["completed"], summary["failed"]) == (NUM_REQUESTS, 0), policy
        assert summary["total_output_tokens"] == NUM_REQUESTS * OUTPUT_LEN


def test_per_request_results_are_timed_from_engine_metrics(runs: dict[str, dict]) -> None:
    for result in runs["kunserve"]["results"]:
        assert 0 <= result["queue_s"] <= result["ttft_s"] <= result["e2e_s"]
        assert (result["prompt_tokens"], result["output_tokens"]) == (PROMPT_LEN, OUTPUT_LEN)


def test_itl_is_left_empty_and_said_so(runs: dict[str, dict]) -> None:
    summary = runs["recompute"]["summary"]
    assert summary["itl_ms"]["count"] == 0
    assert "not measured" in summary["itl_note"]


def test_slos_are_multiples_of_the_unloaded_latency(runs: dict[str, dict]) -> None:
    for policy in POLICIES:
        unloaded, summary = runs[policy]["unloaded"], runs[policy]["summary"]
        assert (unloaded["prompt_len"], unloaded["output_len"]) == (PROMPT_LEN, OUTPUT_LEN)
        assert summary["slo_ttft_ms"] == pytest.approx(unloaded["ttft_s"] * SLO_TTFT_FACTOR * 1000)
        assert summary["slo_tpot_ms"] == pytest.approx(unloaded["tpot_s"] * SLO_TPOT_FACTOR * 1000)
        assert summary["slo_attainment"] is not None


def test_the_burst_preempts_under_recompute(runs: dict[str, dict]) -> None:
    assert runs["recompute"]["summary"]["preemptions"] > 0


def test_recomputed_preemptions_count_no_swap_out(runs: dict[str, dict]) -> None:
    assert runs["recompute"]["summary"]["swap_outs"] == 0


def test_kunserve_drops_and_restores_and_recompute_does_not(runs: dict[str, dict]) -> None:
    kinds = [t["kind"] for t in runs["kunserve"]["transitions"]]
    assert kinds[:2] == ["drop", "restore"]
    assert runs["kunserve"]["settled"]
    assert runs["recompute"]["transitions"] == []


def test_transitions_lie_on_the_timeline_axis(runs: dict[str, dict]) -> None:
    timeline = runs["kunserve"]["timeline"]
    drop = runs["kunserve"]["transitions"][0]
    assert 0 <= drop["start_s"] <= drop["end_s"] <= timeline[-1]["t_s"]


def test_the_timeline_samples_every_replica(runs: dict[str, dict]) -> None:
    timeline = runs["kunserve"]["timeline"]
    assert len(timeline) > 1
    assert all([r["replica"] for r in s["replicas"]] == [0, 1] for s in timeline)
    assert any(r["mode"] == "pipeline" for s in timeline for r in s["replicas"])
    assert max(r["kv_usage"] for s in timeline for r in s["replicas"]) > 0


def test_table_md_has_a_row_per_policy_and_the_ttft_ratio(run: tuple[Path, str]) -> None:
    table = (run[0] / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "policy" not in line]
    assert [row.split("|")[1].strip() for row in rows] == list(POLICIES)
    assert "P99 TTFT, best baseline (recompute) / kunserve" in table


def test_the_table_and_transitions_are_printed(run: tuple[Path, str]) -> None:
    out_dir, printed = run
    assert (out_dir / "table.md").read_text().strip() in printed
    assert "kunserve: drop of replicas" in printed and "recompute: no transitions" in printed


@pytest.mark.parametrize("name", ["ttft_cdf.png", "timeline_recompute.png", "timeline_kunserve.png"])
def test_plots_are_png_images(run: tuple[Path, str], name: str) -> None:
    image = matplotlib.image.imread(run[0] / name)
    assert image.ndim == 3 and min(image.shape[:2]) > 0
