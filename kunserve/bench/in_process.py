"""Replays a workload on a `Cluster` in this process, without HTTP.

Each request is added at its arrival offset (open loop: a slow cluster does not slow the
arrivals) and awaited as one final output; its latencies come from the engine's own request
metrics (all time.monotonic), so every overload policy is timed by the same code. Per-token
outputs would make this Python frontend the bottleneck at GPU rates, so inter-token
latencies are not measured in this mode.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from tqdm import tqdm

from kunserve.bench.client import RequestResult
from kunserve.bench.workload import RequestSpec
from kunserve.cluster.cluster import Cluster
from kunserve.engine.async_engine import AsyncEngine, RequestStream
from kunserve.outputs import RequestOutput
from kunserve.sampling_params import RequestOutputKind, SamplingParams

ABORTED = "abort"  # the finish reason of a request that was aborted
ITL_NOT_MEASURED = "not measured: the in-process replay sees each request's final output only"


@dataclass
class InProcessResult(RequestResult):
    queue_s: float | None = None  # arrival to first scheduled
    num_preemptions: int = 0
    num_swap_outs: int = 0  # of its preemptions, those that swapped its KV out (the others recomputed)


def preemption_counts(results: list[InProcessResult]) -> dict[str, int]:
    """A run's preemptions, and how many of them swapped the request's KV out."""
    return {"preemptions": sum(r.num_preemptions for r in results), "swap_outs": sum(r.num_swap_outs for r in results)}


def request_params(output_len: int) -> SamplingParams:
    """Greedy, exactly `output_len` tokens, one output at the end."""
    return SamplingParams(
        temperature=0.0, max_tokens=output_len, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY
    )


def result_from_output(output: RequestOutput, prompt_len: int, output_len: int, sent_at: float) -> InProcessResult:
    """A request's result from its final output's metrics; an output that is not a clean finish
    is a failed request."""
    result = InProcessResult(prompt_len=prompt_len, output_len=output_len, sent_at=sent_at)
    metrics = output.metrics
    completion = output.outputs[0] if output.outputs else None
    if output.error is not None:
        result.error = output.error
    elif not output.finished or completion is None or completion.finish_reason == ABORTED:
        result.error = "request did not finish"
    elif metrics is None or metrics.first_token_time is None or metrics.finished_time is None:
        result.error = "final output without timing metrics"
    if result.error is not None or metrics is None:
        return result
    result.ttft_s = metrics.first_token_time - metrics.arrival_time
    result.e2e_s = metrics.finished_time - metrics.arrival_time
    if metrics.first_scheduled_time is not None:
        result.queue_s = metrics.first_scheduled_time - metrics.arrival_time
    result.num_preemptions, result.num_swap_outs = metrics.num_preemptions, metrics.num_swap_outs
    result.prompt_tokens = len(output.prompt_token_ids)
    result.output_tokens = len(completion.token_ids)
    return result


async def final_output(stream: RequestStream) -> RequestOutput | None:
    """The last output of a one-request stream (None if it ended without one)."""
    last = None
    async for output in stream:
        last = output
    return last


async def send_one(
    target: Cluster | AsyncEngine, request_id: str, prompt: list[int], output_len: int, timeout_s: float
) -> InProcessResult:
    """Add one request now (to the cluster's dispatcher, or to one replica) and await its end.
    Failures, a timeout included (the request is then aborted), are recorded, never raised."""
    result = InProcessResult(prompt_len=len(prompt), output_len=output_len, sent_at=time.perf_counter())
    try:
        stream = target.add_requests([request_id], [prompt], [request_params(output_len)])
    except Exception as exc:  # noqa: BLE001 -- a refused request is a result, never the run's failure
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    with stream:  # closing aborts the request if it has not finished (a timeout)
        try:
            output = await asyncio.wait_for(final_output(stream), timeout_s)
        except asyncio.TimeoutError:
            result.error = f"timed out after {timeout_s} s"
            return result
        except Exception as exc:  # noqa: BLE001 -- e.g. EngineDeadError: the replica's worker died
            result.error = f"{type(exc).__name__}: {exc}"
            return result
    if output is None:
        result.error = "stream ended without an output"
        return result
    return result_from_output(output, len(prompt), output_len, result.sent_at)


async def replay(
    cluster: Cluster,
    specs: list[RequestSpec],
    prompts: list[list[int]],
    *,
    request_id_prefix: str,
    timeout_s: float,
    max_concurrency: int | None = None,
    show_progress: bool = True,
) -> tuple[list[InProcessResult], float]:
    """Add every request at its arrival offset; return the results in spec order and the wall
    time from the start to the last completion."""
    if len(specs) != len(prompts):
        raise ValueError(f"{len(specs)} specs but {len(prompts)} prompts")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
    semaphore = None if max_concurrency is None else asyncio.Semaphore(max_concurrency)
    progress = tqdm(total=len(specs), disable=not show_progress, desc="requests")
    start = time.perf_counter()

    async def send_at_arrival(index: int, spec: RequestSpec, prompt: list[int]) -> InProcessResult:
        await asyncio.sleep(max(0.0, start + spec.arrival_s - time.perf_counter()))
        request_id = f"{request_id_prefix}{index}"
        if semaphore is None:
            result = await send_one(cluster, request_id, prompt, spec.output_len, timeout_s)
        else:
            async with semaphore:
                result = await send_one(cluster, request_id, prompt, spec.output_len, timeout_s)
        progress.update(1)
        return result

    results = await asyncio.gather(*(send_at_arrival(i, s, p) for i, (s, p) in enumerate(zip(specs, prompts))))
    duration = time.perf_counter() - start
    progress.close()
    return list(results), duration
