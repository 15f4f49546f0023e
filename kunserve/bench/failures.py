"""Why a benchmark's requests failed, in words a user can act on: each known cause names its
fix; `kunserve bench` then exits non-zero (a benchmark whose requests failed measured
something else than the workload)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownCause:
    pattern: str  # a regular expression searched in a request's error
    fix: str  # what to do, formatted with the workload's figures (see `explain_failures`)


KNOWN_CAUSES = (
    KnownCause(r"ConnectError|Connection refused|All connection attempts failed",
               "no server answered at {base_url}: start one (`kunserve serve`) or point --base-url at one; "
               "`kunserve bench --launch` starts a cluster in this process instead"),
    KnownCause(r"longer than max_model_len",
               "prompts longer than the server's max_model_len: start the server with --max-model-len "
               "{longest_request} (this workload's longest prompt + output), or replay fewer rows "
               "(--num-prompts, --trace-start-s / --trace-duration-s)"),
    KnownCause(r"more than the KV cache holds",
               "requests larger than a replica's whole KV cache: give it more (--memory-budget, "
               "--gpu-memory-utilization, --num-kv-blocks) or cap the lengths"),
    KnownCause(r"HTTP 401", "the server wants an API key: pass the one it was started with as --api-key"),
    KnownCause(r"HTTP 404", "the server serves another model name: --model must be one of GET /v1/models"),
    KnownCause(r"HTTP 503", "the server's queue was full (its --max-waiting-requests): send less at once "
                            "(--request-rate, --max-concurrency) or raise that limit"),
    KnownCause(r"timed out|Timeout", "requests outlasted --timeout-s: raise it, or send less load"),
)


def explain_failures(errors: list[str | None], base_url: str | None, longest_request: int) -> list[str]:
    """Lines saying how many requests failed and, per cause, how many and the fix; causes not
    known are quoted (their first error). Empty when none failed."""
    failed = [error for error in errors if error is not None]
    if not failed:
        return []
    lines = [f"{len(failed)} of {len(errors)} requests failed"]
    unknown: Counter[str] = Counter()
    known: Counter[KnownCause] = Counter()
    for error in failed:
        cause = next((c for c in KNOWN_CAUSES if re.search(c.pattern, error)), None)
        if cause is None:
            unknown[error] += 1
        else:
            known[cause] += 1
    figures = {"base_url": base_url, "longest_request": longest_request}
    lines += [f"  {count}: {cause.fix.format(**figures)}" for cause, count in known.items()]
    if unknown:
        first, _ = unknown.most_common(1)[0]
        lines.append(f"  {sum(unknown.values())} for other reasons; the most frequent: {first}")
    return lines
