"""What a benchmark sends and when: request arrivals and lengths, from a trace or synthetic.

Trace replay reads the Azure LLM inference trace format (`TIMESTAMP,ContextTokens,GeneratedTokens`).
A trace can be cut to a window of its recorded time and its rate multiplied while keeping its
burst shape (TraceUpscaler-style sampling, see `scale_rate`).
Synthetic arrivals have gamma-distributed gaps, so one coefficient of variation spans smooth
(cv < 1), Poisson (cv = 1) and bursty (cv > 1) load at the same mean rate.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TIMESTAMP_COLUMN = "TIMESTAMP"
PROMPT_COLUMN = "ContextTokens"
OUTPUT_COLUMN = "GeneratedTokens"
MIN_TOKENS = 1


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float  # offset from the start of the run
    prompt_len: int
    output_len: int


def load_trace(
    path: str | Path,
    *,
    time_scale: float | None = None,
    request_rate: float | None = None,
    limit: int | None = None,
    start_s: float | None = None,
    duration_s: float | None = None,
    rate_scale: float | None = None,
    seed: int = 0,
) -> list[RequestSpec]:
    """Requests of a trace CSV, arrivals relative to its first row.

    `start_s`/`duration_s` keep the rows recorded in [start_s, start_s + duration_s) after the
    first row, arrivals then relative to the first row kept. `limit` keeps the first rows (of the window)
    only. `time_scale` multiplies every arrival offset (0.5 replays twice as fast); `request_rate`
    instead rescales the offsets so the mean gap is 1/rate (inf: all at once). `rate_scale`
    multiplies the rate by sampling arrivals (`scale_rate`, seeded by `seed`).
    """
    if time_scale is not None and request_rate is not None:
        raise ValueError("give at most one of time_scale and request_rate")
    if rate_scale is not None and request_rate is not None:
        raise ValueError("give at most one of rate_scale and request_rate")
    if start_s is not None and not (math.isfinite(start_s) and start_s >= 0):
        raise ValueError(f"start_s must be non-negative and finite, got {start_s}")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    if time_scale is not None and not (math.isfinite(time_scale) and time_scale > 0):
        raise ValueError(f"time_scale must be positive and finite, got {time_scale}")
    if request_rate is not None and not request_rate > 0:
        raise ValueError(f"request_rate must be positive, got {request_rate}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")

    windowed = start_s is not None or duration_s is not None
    # A window's first rows are not the file's: read it all, cut the window, then apply the limit.
    timestamps, prompt_lens, output_lens = _read_trace_rows(Path(path), None if windowed else limit)
    # datetime64[ns] parses the trace's 7 fractional digits exactly (Python's datetime stops at 6).
    times = np.array(timestamps, dtype="datetime64[ns]")
    if np.any(np.diff(times) < np.timedelta64(0, "ns")):
        raise ValueError(f"{path}: timestamps must be non-decreasing")
    arrivals = (times - times[0]) / np.timedelta64(1, "s")
    lens = np.array([prompt_lens, output_lens])
    if windowed:
        arrivals, lens = _window(arrivals, lens, start_s or 0.0, math.inf if duration_s is None else duration_s)
        if len(arrivals) == 0:
            raise ValueError(f"{path}: no rows in the window start_s={start_s}, duration_s={duration_s}")
        arrivals, lens = arrivals[:limit] - arrivals[0], lens[:, :limit]
    if time_scale is not None:
        arrivals = arrivals * time_scale
    elif request_rate is not None:
        arrivals = _rescale_to_rate(arrivals, request_rate)
    # The trace has rows with zero tokens; a request needs at least one prompt token and asks
    # for at least one output token, so such rows are clamped rather than dropped, keeping arrivals intact.
    specs = [
        RequestSpec(float(a), max(int(p), MIN_TOKENS), max(int(o), MIN_TOKENS)) for a, p, o in zip(arrivals, *lens)
    ]
    return specs if rate_scale is None else scale_rate(specs, rate_scale, seed)


def _window(arrivals: np.ndarray, lens: np.ndarray, start_s: float, duration_s: float) -> tuple[np.ndarray, np.ndarray]:
    """The arrivals in [start_s, start_s + duration_s) and their lengths."""
    keep = (arrivals >= start_s) & (arrivals < start_s + duration_s)
    return arrivals[keep], lens[:, keep]


def scale_rate(specs: list[RequestSpec], factor: float, seed: int) -> list[RequestSpec]:
    """TraceUpscaler-style rate scaling: each request becomes ceil(factor) candidates at its
    arrival, each kept with probability factor / ceil(factor), so the expected rate is `factor`
    times the original's and bursts stay where they were (factor < 1 thins the trace)."""
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"rate scale must be positive and finite, got {factor}")
    candidates = math.ceil(factor)
    kept = np.random.default_rng(seed).random((len(specs), candidates)) < factor / candidates
    scaled = [spec for spec, copies in zip(specs, kept.sum(axis=1)) for _ in range(copies)]
    if not scaled:
        raise ValueError(f"rate scale {factor} kept none of the {len(specs)} requests")
    return scaled


def _read_trace_rows(path: Path, limit: int | None) -> tuple[list[str], list[int], list[int]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise ValueError(f"{path}: empty trace file")
        missing = [c for c in (TIMESTAMP_COLUMN, PROMPT_COLUMN, OUTPUT_COLUMN) if c not in reader.fieldnames]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; header is {reader.fieldnames}")
        timestamps: list[str] = []
        prompt_lens: list[int] = []
        output_lens: list[int] = []
        for row in reader:
            if limit is not None and len(timestamps) == limit:
                break
            timestamps.append(row[TIMESTAMP_COLUMN].strip())
            prompt_lens.append(int(row[PROMPT_COLUMN]))
            output_lens.append(int(row[OUTPUT_COLUMN]))
    if not timestamps:
        raise ValueError(f"{path}: trace has a header but no rows")
    return timestamps, prompt_lens, output_lens


def _rescale_to_rate(arrivals: np.ndarray, request_rate: float) -> np.ndarray:
    span = arrivals[-1]
    if math.isinf(request_rate) or span == 0:
        return np.zeros_like(arrivals)
    target_span = (len(arrivals) - 1) / request_rate
    return arrivals * (target_span / span)


def synthetic_arrivals(num: int, request_rate: float, cv: float, seed: int) -> np.ndarray:
    """`num` arrival offsets in seconds, the first at 0, with gamma-distributed gaps of mean
    1/request_rate and coefficient of variation `cv` (cv = 1 is a Poisson process)."""
    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be positive, got {request_rate}")
    if not (math.isfinite(cv) and cv > 0):
        raise ValueError(f"cv must be positive and finite, got {cv}")
    if math.isinf(request_rate):
        return np.zeros(num)
    shape = 1.0 / cv**2
    scale = cv**2 / request_rate
    gaps = np.random.default_rng(seed).gamma(shape, scale, size=num - 1)
    return np.concatenate(([0.0], np.cumsum(gaps)))


def synthetic_workload(
    num: int, request_rate: float, cv: float, input_len: int, output_len: int, seed: int
) -> list[RequestSpec]:
    """`num` requests of fixed prompt and output lengths at gamma arrivals (see `synthetic_arrivals`)."""
    if input_len < MIN_TOKENS or output_len < MIN_TOKENS:
        raise ValueError(f"input_len and output_len must be at least {MIN_TOKENS}, got {input_len}, {output_len}")
    arrivals = synthetic_arrivals(num, request_rate, cv, seed)
    return [RequestSpec(float(a), input_len, output_len) for a in arrivals]


@dataclass(frozen=True)
class LengthSet:
    """A synthetic request set: prompt and output lengths drawn to the mean token counts of
    a public dataset as the KunServe paper reports them, clipped to the stated ranges.
    Lengths are lognormal with spread `sigma` (a long right tail, as chat lengths have);
    `pareto_outputs` draws outputs instead as min · (1 + Pareto(alpha)), clipped: the heavy
    tail of reasoning traces."""

    input_mean: float
    output_mean: float
    input_range: tuple[int, int]
    output_range: tuple[int, int]
    sigma: float = 1.0
    pareto_outputs: float | None = None  # alpha

    def draw(self, num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        prompts = _lognormal(rng, self.input_mean, self.sigma, num, self.input_range)
        if self.pareto_outputs is None:
            outputs = _lognormal(rng, self.output_mean, self.sigma, num, self.output_range)
        else:
            low, high = self.output_range
            outputs = np.clip(low * (1 + rng.pareto(self.pareto_outputs, num)), low, high).astype(np.int64)
        return prompts, outputs


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, num: int, bounds: tuple[int, int]) -> np.ndarray:
    mu = math.log(mean) - sigma**2 / 2  # a lognormal's mean is exp(mu + sigma^2 / 2)
    return np.clip(np.rint(rng.lognormal(mu, sigma, num)), *bounds).astype(np.int64)


# Mean input / output tokens as the paper reports them (BurstGPT 642 / 262, ShareGPT 1,660 /
# 373 with inputs up to 4k, LongBench ~5.9k / 499), and a reasoning-like set: short prompts,
# outputs of 1k-7k tokens with a heavy tail (mean ~2.4k). The lognormal means are set so
# that the clipped draws have the reported means (ShareGPT's clip at 4k lowers its mean).
DATASETS: dict[str, LengthSet] = {
    "burstgpt": LengthSet(642, 262, (4, 4096), (4, 2048)),
    "sharegpt": LengthSet(1850, 373, (4, 4096), (4, 2048), sigma=0.8),
    "longbench": LengthSet(6050, 499, (2048, 7168), (64, 1024), sigma=0.2),
    "reasoning": LengthSet(200, 2400, (32, 1024), (1024, 7168), sigma=0.6, pareto_outputs=1.4),
}


def dataset_workload(name: str, arrivals: np.ndarray, seed: int) -> list[RequestSpec]:
    """Requests of the length set `name` (DATASETS) arriving at `arrivals`."""
    if name not in DATASETS:
        raise ValueError(f"dataset: expected one of {sorted(DATASETS)}, got {name!r}")
    prompts, outputs = DATASETS[name].draw(len(arrivals), seed)
    return [RequestSpec(float(a), int(p), int(o)) for a, p, o in zip(arrivals, prompts, outputs)]


def prompt_token_ids(specs: list[RequestSpec], max_token_id: int, seed: int) -> list[list[int]]:
    """Random token ids in [0, max_token_id) of each spec's prompt length.

    Prompts go to the server as token ids so their lengths are exact whatever the tokenizer.
    """
    if max_token_id < 1:
        raise ValueError(f"max_token_id must be at least 1, got {max_token_id}")
    rng = np.random.default_rng(seed)
    return [rng.integers(0, max_token_id, size=spec.prompt_len).tolist() for spec in specs]
