"""SLOs relative to unloaded latency: a request meets its SLO when its TTFT is at most
SLO_TTFT_FACTOR times the unloaded TTFT and its TPOT at most SLO_TPOT_FACTOR times the
unloaded TPOT. The unloaded values are the mean of a few requests of the workload's median
shape, sent one at a time to the idle cluster that then serves the workload."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kunserve.bench.client import RequestResult
from kunserve.bench.report import MS_PER_S, request_tpot_s
from kunserve.bench.workload import RequestSpec

SLO_TTFT_FACTOR = 5.0
SLO_TPOT_FACTOR = 1.5
UNLOADED_REQUESTS = 3  # sent one at a time; their mean is the reference


@dataclass(frozen=True)
class Slo:
    ttft_s: float | None
    tpot_s: float | None


@dataclass(frozen=True)
class UnloadedReference:
    prompt_len: int
    output_len: int
    num_requests: int  # that completed
    ttft_s: float | None  # mean; None when none completed
    tpot_s: float | None  # mean; None when outputs have one token (no TPOT)


def reference_shape(specs: list[RequestSpec]) -> tuple[int, int]:
    """The workload's median prompt and output lengths (rounded to tokens)."""
    prompt_len = round(float(np.median([s.prompt_len for s in specs])))
    output_len = round(float(np.median([s.output_len for s in specs])))
    return prompt_len, output_len


def unloaded_reference(results: list[RequestResult], prompt_len: int, output_len: int) -> UnloadedReference:
    """The mean TTFT and TPOT of the completed unloaded requests."""
    done = [r for r in results if r.error is None and r.ttft_s is not None]
    tpots = [t for t in map(request_tpot_s, done) if t is not None]
    return UnloadedReference(
        prompt_len,
        output_len,
        len(done),
        float(np.mean([r.ttft_s for r in done])) if done else None,
        float(np.mean(tpots)) if tpots else None,
    )


def derive_slo(reference: UnloadedReference, ttft_ms: float | None = None, tpot_ms: float | None = None) -> Slo:
    """SLO_*_FACTOR times the unloaded values; an explicit `ttft_ms`/`tpot_ms` overrides its own."""
    ttft_s = ttft_ms / MS_PER_S if ttft_ms is not None else _scaled(reference.ttft_s, SLO_TTFT_FACTOR)
    tpot_s = tpot_ms / MS_PER_S if tpot_ms is not None else _scaled(reference.tpot_s, SLO_TPOT_FACTOR)
    return Slo(ttft_s, tpot_s)


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor
