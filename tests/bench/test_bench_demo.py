"""`kunserve bench --demo`, the README's first command: with no arguments it runs the embedded
tiny model on two CPU worker processes through a burst, for recompute and kunserve, and
prints the side-by-side table; every request completes under both policies and kunserve
fuses the replicas."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest

from kunserve.bench.demo import DemoConfig
from kunserve.cli import main

pytestmark = pytest.mark.slow  # the whole demo, about a minute


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out_dir = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["bench", "--demo", "--no-progress", "--out-dir", str(out_dir)])
    return json.loads((out_dir / "results.json").read_text()), printed.getvalue()


def test_the_demo_runs_recompute_and_kunserve_on_the_same_burst(demo: tuple[dict, str]) -> None:
    record, _ = demo
    assert [run["policy"] for run in record["runs"]] == list(DemoConfig().policies)


def test_every_demo_request_completes_under_both_policies(demo: tuple[dict, str]) -> None:
    record, _ = demo
    for run in record["runs"]:
        assert run["summary"]["completed"] == DemoConfig().num_prompts and run["summary"]["failed"] == 0


def test_kunserve_fuses_the_replicas_during_the_demo_burst(demo: tuple[dict, str]) -> None:
    record, _ = demo
    kunserve = next(run for run in record["runs"] if run["policy"] == "kunserve")
    assert "drop" in [t["kind"] for t in kunserve["transitions"]]


def test_the_demo_prints_the_side_by_side_table(demo: tuple[dict, str]) -> None:
    _, printed = demo
    assert "| recompute |" in printed and "| kunserve |" in printed


def test_kunserve_restores_after_each_drop(demo: tuple[dict, str]) -> None:
    record, _ = demo
    kunserve = next(run for run in record["runs"] if run["policy"] == "kunserve")
    kinds = [t["kind"] for t in kunserve["transitions"]]
    assert kinds and kinds == ["drop", "restore"] * (len(kinds) // 2)


def test_the_demo_says_what_happened_to_each_policy(demo: tuple[dict, str]) -> None:
    _, printed = demo
    assert "What happened:" in printed and "recompute: queue peaked at" in printed
    assert re.search(r"kunserve: \d+ drops as bursts came", printed) and "P99 TTFT, recompute / kunserve:" in printed


def test_the_demo_slos_are_absolute(demo: tuple[dict, str]) -> None:
    record, _ = demo
    for run in record["runs"]:
        assert (run["slo"]["ttft_ms"], run["slo"]["tpot_ms"]) == (DemoConfig().slo_ttft_ms, DemoConfig().slo_tpot_ms)
