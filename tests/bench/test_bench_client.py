"""The benchmark client and command against a fake streaming server on loopback."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kunserve.bench.run import add_bench_arguments, run_bench
from kunserve.cli import main
from kunserve.exit_codes import EXIT_REQUESTS_FAILED

API_KEY = "secret"
FAIL_PROMPT_LEN = 3  # the fake server answers 500 to prompts of this length
METRICS_TEXT = """\
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total 7.0
"""


class FakeServer:
    """Streams one SSE chunk per requested token, then usage and [DONE]; serves a fixed /metrics."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []
        self.auth_headers: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def stop(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        request_line, *header_lines = head.strip().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
        body = await reader.readexactly(int(headers.get("content-length", 0)))
        if request_line.startswith("GET /metrics"):
            data = METRICS_TEXT.encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(data) + data
            )
        elif request_line.startswith("GET"):  # /health
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        else:
            payload = json.loads(body)
            self.payloads.append(payload)
            self.auth_headers.append(headers.get("authorization", ""))
            if len(payload["prompt"]) == FAIL_PROMPT_LEN:
                writer.write(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nConnection: close\r\n\r\nboom"
                )
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
                for _ in range(payload["max_tokens"]):
                    writer.write(b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n')
                    await writer.drain()
                usage = {"prompt_tokens": len(payload["prompt"]), "completion_tokens": payload["max_tokens"]}
                writer.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        await writer.drain()
        writer.close()


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    fake.start()
    yield fake
    fake.stop()


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(list(argv))


def test_run_bench_against_a_streaming_server(server: FakeServer, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    base_url = f"http://127.0.0.1:{server.port}"
    args = bench_args(
        "--base-url", base_url, "--api-key", API_KEY, "--num-prompts", "6", "--input-len", "5", "--output-len", "4",
        "--max-concurrency", "2", "--slo-ttft-ms", "60000", "--no-progress", "--out", str(out),
    )  # fmt: skip
    summary = run_bench(args)
    assert (summary["completed"], summary["failed"]) == (6, 0)
    assert (summary["total_prompt_tokens"], summary["total_output_tokens"]) == (30, 24)
    assert summary["ttft_ms"]["count"] == 6
    assert summary["itl_ms"]["count"] == 6 * 3
    assert summary["slo_attainment"] == 1.0
    assert summary["server"] == {"vllm:generation_tokens_total": {"value": 0.0}}
    payload = server.payloads[0]
    assert "model" not in payload
    assert len(payload["prompt"]) == 5 and payload["max_tokens"] == 4
    assert payload["stream"] and payload["ignore_eos"] and payload["stream_options"] == {"include_usage": True}
    assert set(server.auth_headers) == {f"Bearer {API_KEY}"}
    record = json.loads(out.read_text())
    assert len(record["results"]) == 6
    assert record["args"]["request_rate"] is None


def test_failures_are_recorded_not_raised(server: FakeServer, tmp_path: Path) -> None:
    args = bench_args(
        "--base-url", f"http://127.0.0.1:{server.port}", "--model", "m", "--num-prompts", "2",
        "--input-len", str(FAIL_PROMPT_LEN), "--no-progress", "--out", str(tmp_path / "bench.json"),
    )  # fmt: skip
    summary = run_bench(args)
    assert (summary["completed"], summary["failed"]) == (0, 2)
    assert server.payloads[0]["model"] == "m"
    errors = {r["error"] for r in json.loads((tmp_path / "bench.json").read_text())["results"]}
    assert errors == {"HTTP 500: boom"}


def test_unreachable_server_fails_requests_and_has_no_server_section() -> None:
    stopped = FakeServer()
    stopped.start()
    stopped.stop()  # nothing listens on its port now
    port = stopped.port
    summary = run_bench(bench_args("--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "1", "--no-progress"))
    assert (summary["completed"], summary["failed"]) == (0, 1)
    assert summary["server"] is None


def test_the_bench_command_exits_non_zero_when_requests_fail(
    server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--base-url", f"http://127.0.0.1:{server.port}", "--num-prompts", "2",
              "--input-len", str(FAIL_PROMPT_LEN), "--no-progress"])
    assert exited.value.code == EXIT_REQUESTS_FAILED
    assert "2 of 2 requests failed" in caplog.text and "HTTP 500: boom" in caplog.text


def test_the_bench_command_with_no_server_says_how_to_start_one() -> None:
    stopped = FakeServer()
    stopped.start()
    stopped.stop()
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--base-url", f"http://127.0.0.1:{stopped.port}", "--num-prompts", "1", "--no-progress"])
    assert "no server answers" in str(exited.value.code) and "kunserve serve" in str(exited.value.code)
