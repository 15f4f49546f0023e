"""A benchmark's failed requests are explained: how many, and per known cause what to do."""

from __future__ import annotations

from kunserve.bench.failures import explain_failures

URL = "http://127.0.0.1:8000"


def test_no_failures_need_no_explanation() -> None:
    assert explain_failures([None, None], URL, 100) == []


def test_the_count_of_failed_requests_comes_first() -> None:
    assert explain_failures([None, "ConnectError: boom", None], URL, 100)[0] == "1 of 3 requests failed"


def test_a_refused_connection_says_to_start_a_server() -> None:
    lines = explain_failures(["ConnectError: [Errno 111] Connection refused"], URL, 100)
    assert URL in lines[1] and "kunserve serve" in lines[1] and "--launch" in lines[1]


def test_a_prompt_over_max_model_len_names_the_flag_and_the_length_needed() -> None:
    error = 'HTTP 400: {"error": {"message": "prompt: 3000 tokens is longer than max_model_len=2048"}}'
    lines = explain_failures([error, error], URL, 3100)
    assert lines[1].startswith("  2: ") and "--max-model-len 3100" in lines[1]


def test_an_unknown_cause_is_quoted() -> None:
    lines = explain_failures(["HTTP 500: boom", "HTTP 500: boom", "HTTP 502: bad gateway"], URL, 100)
    assert lines[1] == "  3 for other reasons; the most frequent: HTTP 500: boom"
