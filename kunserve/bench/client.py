"""Sends a workload to an OpenAI-compatible `/v1/completions` endpoint, streaming, and times each token.

Each request leaves at its arrival offset (open loop: a slow server does not slow the
arrivals), optionally capped at `max_concurrency` in flight. Every token-carrying chunk of the
server-sent-events stream is timestamped: the first gives the time to first token, later ones
the inter-token latencies; the final usage chunk gives the token counts the server counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from kunserve.bench.workload import RequestSpec

COMPLETIONS_PATH = "/v1/completions"
SSE_DATA_PREFIX = "data:"
SSE_DONE = "[DONE]"
HTTP_OK = 200


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int  # requested max_tokens
    sent_at: float = 0.0  # time.perf_counter() when the request left
    ttft_s: float | None = None
    itls_s: list[float] = field(default_factory=list)  # gaps between consecutive token chunks
    e2e_s: float = 0.0
    output_tokens: int = 0  # usage.completion_tokens
    prompt_tokens: int = 0  # usage.prompt_tokens
    error: str | None = None


def completion_payload(model: str | None, prompt: list[int], max_tokens: int) -> dict:
    payload = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model is not None:
        payload["model"] = model
    return payload


async def run_requests(
    base_url: str,
    model: str | None,
    specs: list[RequestSpec],
    prompts: list[list[int]],
    *,
    api_key: str | None = None,
    max_concurrency: int | None = None,
    timeout_s: float,
    show_progress: bool = True,
) -> tuple[list[RequestResult], float]:
    """Send every request at its arrival offset; return the results in spec order and the
    wall time from the first send to the last completion. Failures are recorded, never raised."""
    if len(specs) != len(prompts):
        raise ValueError(f"{len(specs)} specs but {len(prompts)} prompts")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
    url = base_url.rstrip("/") + COMPLETIONS_PATH
    headers = {"Authorization": f"Bearer {api_key}"} if api_key is not None else {}
    in_flight = len(specs) if max_concurrency is None else max_concurrency
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    semaphore = None if max_concurrency is None else asyncio.Semaphore(max_concurrency)
    progress = tqdm(total=len(specs), disable=not show_progress, desc="requests")

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s)) as client:
        start = time.perf_counter()

        async def send_at_arrival(spec: RequestSpec, prompt: list[int]) -> RequestResult:
            await asyncio.sleep(max(0.0, start + spec.arrival_s - time.perf_counter()))
            payload = completion_payload(model, prompt, spec.output_len)
            if semaphore is None:
                result = await stream_completion(client, url, headers, payload, spec.prompt_len)
            else:
                async with semaphore:
                    result = await stream_completion(client, url, headers, payload, spec.prompt_len)
            progress.update(1)
            return result

        results = await asyncio.gather(*(send_at_arrival(s, p) for s, p in zip(specs, prompts)))
        duration = time.perf_counter() - start
    progress.close()
    return list(results), duration


async def stream_completion(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], payload: dict, prompt_len: int
) -> RequestResult:
    """One streamed completion, timed chunk by chunk."""
    result = RequestResult(prompt_len=prompt_len, output_len=payload["max_tokens"])
    result.sent_at = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code == HTTP_OK:
                await _read_stream(response, result)
            else:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body}"
    except Exception as exc:  # noqa: BLE001 -- a failed request is a result, never the run's failure
        result.error = f"{type(exc).__name__}: {exc}"
    result.e2e_s = time.perf_counter() - result.sent_at
    return result


async def _read_stream(response: httpx.Response, result: RequestResult) -> None:
    last_token_at: float | None = None
    saw_usage = False
    async for line in response.aiter_lines():
        if not line.startswith(SSE_DATA_PREFIX):
            continue  # blank separators and SSE comments
        data = line[len(SSE_DATA_PREFIX) :].strip()
        if data == SSE_DONE:
            break
        chunk = json.loads(data)
        if chunk.get("error"):
            result.error = f"stream error: {json.dumps(chunk['error'])}"
            return
        if chunk.get("choices"):
            now = time.perf_counter()
            if last_token_at is None:
                result.ttft_s = now - result.sent_at
            else:
                result.itls_s.append(now - last_token_at)
            last_token_at = now
        if chunk.get("usage"):
            result.prompt_tokens = chunk["usage"]["prompt_tokens"]
            result.output_tokens = chunk["usage"]["completion_tokens"]
            saw_usage = True
    if result.ttft_s is None:
        result.error = "stream ended without a token"
    elif not saw_usage:
        result.error = "stream ended without a usage chunk"
