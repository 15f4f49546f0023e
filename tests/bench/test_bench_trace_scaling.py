"""Trace scaling: TraceUpscaler-style rate scaling keeps a trace's bursts while multiplying its
rate, and a window replays a slice of the trace's recorded time."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest

from kunserve.bench.run import add_bench_arguments, build_workload
from kunserve.bench.workload import RequestSpec, load_trace, scale_rate

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
NUM_ROWS = 10  # one row a second, prompt length = the second it arrives at
LONG_TRACE = 20_000
TOLERANCE_SD = 5  # standard deviations of the kept count (binomial) a scaled trace may be off by


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.csv"
    rows = [f"2023-11-16 18:15:{i:02d}.5000000,{i + 1},{2 * i + 1}\n" for i in range(NUM_ROWS)]
    path.write_text(HEADER + "".join(rows))
    return path


def long_trace() -> list[RequestSpec]:
    arrivals = np.cumsum(np.random.default_rng(0).exponential(1.0, size=LONG_TRACE))
    return [RequestSpec(float(a), 1, 1) for a in arrivals]


@pytest.mark.parametrize("factor", [0.3, 1.0, 2.5, 4.0])
def test_rate_scale_multiplies_the_request_count(factor: float) -> None:
    candidates = math.ceil(factor) * LONG_TRACE
    keep = factor / math.ceil(factor)
    sd = math.sqrt(candidates * keep * (1 - keep))
    assert abs(len(scale_rate(long_trace(), factor, seed=0)) - factor * LONG_TRACE) <= TOLERANCE_SD * sd


def test_rate_scale_keeps_arrivals_where_the_trace_has_them() -> None:
    specs = long_trace()
    recorded = {s.arrival_s for s in specs}
    scaled = scale_rate(specs, 2.5, seed=0)
    assert {s.arrival_s for s in scaled} <= recorded
    assert all(a <= b for a, b in zip([s.arrival_s for s in scaled], [s.arrival_s for s in scaled[1:]]))


def test_rate_scale_makes_at_most_ceil_factor_copies_of_an_arrival() -> None:
    scaled = scale_rate(long_trace(), 2.5, seed=0)
    _, copies = np.unique([s.arrival_s for s in scaled], return_counts=True)
    assert copies.max() == math.ceil(2.5)


def test_rate_scale_is_seeded() -> None:
    specs = long_trace()
    assert scale_rate(specs, 1.7, seed=3) == scale_rate(specs, 1.7, seed=3)
    assert scale_rate(specs, 1.7, seed=3) != scale_rate(specs, 1.7, seed=4)


@pytest.mark.parametrize("factor", [0.0, -1.0, math.inf, math.nan])
def test_rate_scale_must_be_positive_and_finite(factor: float) -> None:
    with pytest.raises(ValueError, match="rate scale"):
        scale_rate(long_trace(), factor, seed=0)


def test_load_trace_applies_the_rate_scale_seeded(trace: Path) -> None:
    doubled = load_trace(trace, rate_scale=2.0, seed=0)
    assert len(doubled) == 2 * NUM_ROWS  # ceil(2) candidates, each kept with probability 1
    assert load_trace(trace, rate_scale=0.5, seed=1) == load_trace(trace, rate_scale=0.5, seed=1)


def test_window_keeps_rows_from_start_inclusive_to_end_exclusive(trace: Path) -> None:
    specs = load_trace(trace, start_s=2.0, duration_s=3.0)
    assert [s.prompt_len for s in specs] == [3, 4, 5]  # recorded at 2, 3 and 4 s; the row at 5 s is out


def test_window_arrivals_start_at_its_first_row(trace: Path) -> None:
    specs = load_trace(trace, start_s=2.0, duration_s=3.0)
    assert [s.arrival_s for s in specs] == pytest.approx([0.0, 1.0, 2.0])


def test_window_without_duration_runs_to_the_end(trace: Path) -> None:
    assert [s.prompt_len for s in load_trace(trace, start_s=7.0)] == [8, 9, 10]


def test_window_limit_counts_rows_of_the_window(trace: Path) -> None:
    assert [s.prompt_len for s in load_trace(trace, start_s=4.0, limit=2)] == [5, 6]


def test_window_then_time_scale(trace: Path) -> None:
    specs = load_trace(trace, start_s=2.0, duration_s=3.0, time_scale=0.5)
    assert [s.arrival_s for s in specs] == pytest.approx([0.0, 0.5, 1.0])


def test_empty_window_is_an_error(trace: Path) -> None:
    with pytest.raises(ValueError, match="no rows in the window"):
        load_trace(trace, start_s=NUM_ROWS + 1.0)


@pytest.mark.parametrize(("start_s", "duration_s"), [(-1.0, None), (None, 0.0), (math.nan, None)])
def test_window_bounds_are_validated(trace: Path, start_s: float | None, duration_s: float | None) -> None:
    with pytest.raises(ValueError):
        load_trace(trace, start_s=start_s, duration_s=duration_s)


def test_rate_scale_and_request_rate_are_exclusive(trace: Path) -> None:
    with pytest.raises(ValueError, match="rate_scale.*request_rate"):
        load_trace(trace, rate_scale=2.0, request_rate=3.0)


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_bench_flags_reach_the_trace(trace: Path) -> None:
    args = bench_args("--trace", str(trace), "--trace-start-s", "2", "--trace-duration-s", "3", "--rate-scale", "2")
    assert [s.prompt_len for s in build_workload(args)] == [3, 3, 4, 4, 5, 5]


@pytest.mark.parametrize("flag", ["--rate-scale", "--trace-start-s", "--trace-duration-s"])
def test_trace_flags_need_a_trace(flag: str) -> None:
    with pytest.raises(ValueError, match=f"{flag}: only with --trace"):
        build_workload(bench_args(flag, "2"))
