"""Benchmark workloads: trace replay timing, gamma arrivals, prompt token ids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from kunserve.bench.workload import (
    RequestSpec,
    load_trace,
    prompt_token_ids,
    synthetic_arrivals,
    synthetic_workload,
)

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
# Offsets 0, 0.5, 2, 4 s, in the trace's 7-fractional-digit format; one row has no output tokens.
ROWS = (
    "2023-11-16 18:15:46.6805900,374,44\n"
    "2023-11-16 18:15:47.1805900,396,0\n"
    "2023-11-16 18:15:48.6805900,879,55\n"
    "2023-11-16 18:15:50.6805900,91,16\n"
)
OFFSETS = [0.0, 0.5, 2.0, 4.0]


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(HEADER + ROWS)
    return path


def arrivals(specs: list[RequestSpec]) -> list[float]:
    return [s.arrival_s for s in specs]


def test_trace_arrivals_are_relative_to_the_first_row(trace: Path) -> None:
    specs = load_trace(trace)
    assert arrivals(specs) == pytest.approx(OFFSETS)
    assert [s.prompt_len for s in specs] == [374, 396, 879, 91]
    assert [s.output_len for s in specs] == [44, 1, 55, 16]  # zero clamped to one


def test_trace_time_scale_multiplies_offsets(trace: Path) -> None:
    assert arrivals(load_trace(trace, time_scale=0.5)) == pytest.approx([t * 0.5 for t in OFFSETS])


def test_trace_request_rate_sets_the_mean_rate(trace: Path) -> None:
    rate = 3.0
    specs = load_trace(trace, request_rate=rate)
    assert specs[0].arrival_s == 0.0
    assert np.mean(np.diff(arrivals(specs))) == pytest.approx(1 / rate)
    # The shape of the trace is kept: only the time axis is stretched.
    ratios = np.array(arrivals(specs)[1:]) / np.array(OFFSETS[1:])
    assert ratios == pytest.approx(np.full(len(ratios), ratios[0]))


def test_trace_infinite_request_rate_sends_all_at_once(trace: Path) -> None:
    assert arrivals(load_trace(trace, request_rate=math.inf)) == [0.0] * len(OFFSETS)


def test_trace_time_scale_and_request_rate_are_exclusive(trace: Path) -> None:
    with pytest.raises(ValueError, match="time_scale.*request_rate"):
        load_trace(trace, time_scale=0.5, request_rate=2.0)


def test_trace_limit_takes_the_first_rows(trace: Path) -> None:
    specs = load_trace(trace, limit=2)
    assert arrivals(specs) == pytest.approx(OFFSETS[:2])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        (HEADER, "no rows"),
        ("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.6805900,374\n", "GeneratedTokens"),
        (HEADER + "2023-11-16 18:15:47.0000000,1,1\n2023-11-16 18:15:46.0000000,1,1\n", "non-decreasing"),
    ],
)
def test_trace_rejects_bad_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_trace(path)


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_arrivals_have_the_asked_rate_and_cv(cv: float) -> None:
    rate = 4.0
    gaps = np.diff(synthetic_arrivals(50_000, rate, cv, seed=0))
    assert 1 / gaps.mean() == pytest.approx(rate, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_arrivals_start_at_zero_and_are_seeded() -> None:
    first = synthetic_arrivals(100, 10.0, 2.0, seed=1)
    assert first[0] == 0.0
    assert np.all(np.diff(first) >= 0)
    assert np.array_equal(first, synthetic_arrivals(100, 10.0, 2.0, seed=1))
    assert not np.array_equal(first, synthetic_arrivals(100, 10.0, 2.0, seed=2))


def test_infinite_rate_sends_all_at_once() -> None:
    assert np.array_equal(synthetic_arrivals(5, math.inf, 1.0, seed=0), np.zeros(5))


@pytest.mark.parametrize(("num", "rate", "cv"), [(0, 1.0, 1.0), (10, 0.0, 1.0), (10, 1.0, 0.0), (10, -1.0, 1.0)])
def test_synthetic_arrivals_validate(num: int, rate: float, cv: float) -> None:
    with pytest.raises(ValueError):
        synthetic_arrivals(num, rate, cv, seed=0)


def test_synthetic_workload_has_fixed_lengths() -> None:
    specs = synthetic_workload(10, 2.0, 1.0, input_len=7, output_len=3, seed=0)
    assert len(specs) == 10
    assert {(s.prompt_len, s.output_len) for s in specs} == {(7, 3)}


def test_prompt_token_ids_lengths_range_and_seed() -> None:
    specs = [RequestSpec(0.0, n, 1) for n in (1, 5, 300)]
    max_id = 256
    prompts = prompt_token_ids(specs, max_id, seed=0)
    assert [len(p) for p in prompts] == [1, 5, 300]
    assert all(isinstance(t, int) and 0 <= t < max_id for p in prompts for t in p)
    assert prompts == prompt_token_ids(specs, max_id, seed=0)
    assert prompts != prompt_token_ids(specs, max_id, seed=1)
