"""No request can hurt the server: each fault an attacker found (issue 22) is answered with a
4xx in OpenAI's error shape, and the engine goes on serving.

Specified on the real app and engine in process (Starlette's TestClient): request fields
are checked against what the engine holds (64-bit seeds, top_k within the vocabulary)
before they reach a step; a body is read within --max-request-bytes and parsed, and its
prompt tokenized, off the event loop, so /health answers meanwhile; chat roles the template
refuses and strings that are not valid Unicode are the client's error; unknown paths, wrong
methods and malformed JSON get OpenAI's shape; the bearer scheme is case-insensitive and
/metrics can require the key; operator bodies are checked before the coordinator is asked;
a fault in one request's own output fails that request alone."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from server_harness import WAIT_S, InProcessServer, wait_until

from kunserve.engine.sequence import Sequence
from kunserve.server import api_server
from kunserve.server.api_server import ServerConfig

MODEL = "tiny"
API_KEY = "test-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
JSON_HEADERS = {**HEADERS, "Content-Type": "application/json"}
PROMPT = "Once upon a time"
MAX_REQUEST_BYTES = 256 * 1024
NORMAL = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "ignore_eos": True}


@pytest.fixture(scope="module")
def app(llama_dir: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(llama_dir, ServerConfig(api_key=API_KEY, served_model_names=[MODEL],
                                                     max_request_bytes=MAX_REQUEST_BYTES))
    yield server
    server.stop()


def post(app: InProcessServer, path: str, body: object = None, **kwargs: object) -> httpx.Response:
    if body is not None:
        kwargs["json"] = body
    kwargs.setdefault("headers", HEADERS)
    return app.client.post(path, **kwargs)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status and body["error"]["param"] == param


def assert_serving(app: InProcessServer) -> None:
    """Healthy, and a sampled request (seeded: it draws from its own generator) completes."""
    assert app.client.get("/health").status_code == 200
    response = post(app, "/v1/completions", {**NORMAL, "temperature": 1.0, "seed": 3})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4


# ---- 1: a request field the engine cannot hold --------------------------------------------------


@pytest.mark.parametrize("seed", [2**64, 10**30, -(2**63) - 1, -1])
def test_a_seed_outside_64_bits_is_400_and_the_engine_keeps_serving(app: InProcessServer, seed: int) -> None:
    response = post(app, "/v1/completions", {**NORMAL, "temperature": 1.0, "seed": seed})
    assert_openai_error(response, 400, "seed")
    assert_serving(app)


def test_a_greedy_request_with_a_seed_outside_64_bits_is_400_next_to_a_sampled_one(app: InProcessServer) -> None:
    # Batched with a sampled request, a greedy request's seed reaches the sampler too.
    with ThreadPoolExecutor(1) as pool:
        sampled = pool.submit(post, app, "/v1/completions", {**NORMAL, "temperature": 1.0, "max_tokens": 32})
        wait_until(lambda: bool(app.engine.scheduler.running), "the sampled request to run")
        greedy = post(app, "/v1/completions", {**NORMAL, "temperature": 0.0, "seed": 2**64})
        assert_openai_error(greedy, 400, "seed")
        assert sampled.result().json()["usage"]["completion_tokens"] == 32
    assert_serving(app)


def test_top_k_beyond_the_vocabulary_is_400(app: InProcessServer) -> None:
    response = post(app, "/v1/completions", {**NORMAL, "top_k": 10**30})
    assert_openai_error(response, 400, "top_k")
    assert "vocabulary" in response.json()["error"]["message"]


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_json_constant_that_is_not_json_is_400(app: InProcessServer, constant: str) -> None:
    content = f'{{"prompt": "x", "temperature": {constant}}}'.encode()
    assert_openai_error(post(app, "/v1/completions", content=content, headers=JSON_HEADERS), 400)


# ---- 6: large bodies ----------------------------------------------------------------------------


def test_a_body_over_max_request_bytes_is_413(app: InProcessServer) -> None:
    content = b'{"prompt": "' + b"a" * MAX_REQUEST_BYTES + b'"}'
    response = post(app, "/v1/completions", content=content, headers=JSON_HEADERS)
    assert_openai_error(response, 413)
    assert str(MAX_REQUEST_BYTES) in response.json()["error"]["message"]


def test_a_body_streamed_without_content_length_over_the_limit_is_413(app: InProcessServer) -> None:
    chunk = b" " * 4096

    def body() -> Iterator[bytes]:  # chunked: no Content-Length, so the bytes are counted as they come
        yield b'{"prompt": "x"'
        for _ in range(MAX_REQUEST_BYTES // len(chunk) + 1):
            yield chunk
        yield b"}"

    assert_openai_error(post(app, "/v1/completions", content=body(), headers=JSON_HEADERS), 413)


def answers_health_while_held(app: InProcessServer, owner: object, name: str, body: dict) -> httpx.Response:
    """Hold `owner.name` (a step of reading a request) until /health has answered; the held
    request's response. /health can answer only if that step runs off the event loop."""
    started, release = threading.Event(), threading.Event()
    real = getattr(owner, name)

    def held(*args: object) -> object:
        started.set()
        assert release.wait(WAIT_S), "/health did not answer while the request was held"
        return real(*args)

    setattr(owner, name, held)
    try:
        with ThreadPoolExecutor(1) as pool:
            big = pool.submit(post, app, "/v1/completions", body)
            assert started.wait(WAIT_S)
            health = app.client.get("/health")
            still_held = not big.done()
            release.set()
            response = big.result()
    finally:
        release.set()
        setattr(owner, name, real)
    assert health.status_code == 200 and still_held
    return response


def test_health_answers_while_a_large_body_is_parsed(app: InProcessServer) -> None:
    body = {**NORMAL, "user": "u" * (MAX_REQUEST_BYTES // 2)}  # large, within the limit
    response = answers_health_while_held(app, api_server, "parse_body", body)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4


def test_health_answers_while_a_long_prompt_is_tokenized(app: InProcessServer) -> None:
    body = {**NORMAL, "prompt": "tell me more " * 5000}  # far past max_model_len, found after tokenizing
    response = answers_health_while_held(app, app.cluster.tokenizer, "encode", body)
    assert_openai_error(response, 400, "prompt")
    assert "max_model_len" in response.json()["error"]["message"]


# ---- 7: client errors that were 500s -----------------------------------------------------------


@pytest.mark.parametrize("role", ["wizard", "", "tool"])
def test_a_chat_role_the_template_refuses_is_400(app: InProcessServer, role: str) -> None:
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": role, "content": "hi"}]}
    response = post(app, "/v1/chat/completions", body)
    assert_openai_error(response, 400, "messages")
    assert "role" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "content", "param"),
    [
        ("/v1/completions", '{"prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", '{"prompt": ["ok", "\\udfff"]}', "prompt.1"),
        ("/v1/completions", '{"prompt": "x", "model": "\\ud800"}', "model"),
        ("/v1/completions", '{"prompt": "x", "stop": ["\\udc00"]}', "stop.0"),
        ("/v1/completions", '{"prompt": "x", "\\ud800": 1}', None),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', "messages.0.content"),
    ],
)
def test_a_lone_surrogate_is_400_naming_the_field(app: InProcessServer, path: str, content: str,
                                                 param: str | None) -> None:
    response = post(app, path, content=content.encode(), headers=JSON_HEADERS)
    assert_openai_error(response, 400, param)
    assert "surrogate" in response.json()["error"]["message"]


def test_a_surrogate_pair_is_a_character_not_an_error(app: InProcessServer) -> None:
    content = b'{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'
    assert post(app, "/v1/completions", content=content, headers=JSON_HEADERS).status_code == 200


# ---- 8: OpenAI's error shape everywhere, authentication ------------------------------------------


def test_deeply_nested_json_is_400_in_openai_shape(app: InProcessServer) -> None:
    content = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = post(app, "/v1/completions", content=content, headers=JSON_HEADERS)
    assert_openai_error(response, 400)
    assert "nested" in response.json()["error"]["message"]


def test_an_unknown_path_is_404_in_openai_shape(app: InProcessServer) -> None:
    assert_openai_error(app.client.get("/v1/nothing-here"), 404)


def test_a_wrong_method_is_405_in_openai_shape_naming_the_allowed_one(app: InProcessServer) -> None:
    response = app.client.get("/v1/completions", headers=HEADERS)
    assert_openai_error(response, 405)
    assert response.headers["allow"] == "POST"


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_the_bearer_scheme_is_case_insensitive(app: InProcessServer, scheme: str) -> None:
    response = post(app, "/v1/completions", NORMAL, headers={"Authorization": f"{scheme} {API_KEY}"})
    assert response.status_code == 200


@pytest.mark.parametrize("header", ["Basic test-key", "Bearer", "Bearertest-key", "Bearer wrong", "test-key"])
def test_anything_but_a_bearer_with_the_key_is_401(app: InProcessServer, header: str) -> None:
    assert_openai_error(post(app, "/v1/completions", NORMAL, headers={"Authorization": header}), 401)


def test_metrics_are_open_by_default(app: InProcessServer) -> None:
    assert app.client.get("/metrics").status_code == 200


def test_metrics_can_require_the_api_key(llama_dir: Path) -> None:
    server = InProcessServer(llama_dir, ServerConfig(api_key=API_KEY, metrics_need_key=True))
    try:
        assert_openai_error(server.client.get("/metrics"), 401)
        assert "vllm:num_requests_running" in server.client.get("/metrics", headers=HEADERS).text
        assert server.client.get("/health").status_code == 200  # probes stay open
    finally:
        server.stop()


@pytest.mark.parametrize(("field", "value"), [("metrics_need_key", True), ("max_request_bytes", 0)])
def test_a_server_config_that_cannot_work_is_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ServerConfig(**{field: value})


# ---- operator endpoints: bodies checked before the coordinator is asked ---------------------------


@dataclass
class Recorded:
    """What the stand-in coordinator returns where the real one returns a Transition."""

    call: tuple


@pytest.fixture
def coordinator_calls(app: InProcessServer, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The coordinator's drop and restore, recorded instead of run."""
    calls: list[tuple] = []

    def record(name: str) -> Callable[..., Recorded]:
        def call(*args: object) -> Recorded:
            calls.append((name, *args))
            return Recorded(calls[-1])

        return call

    monkeypatch.setattr(app.cluster.coordinator.runner, "drop", record("drop"))
    monkeypatch.setattr(app.cluster.coordinator.runner, "restore", record("restore"))
    return calls


@pytest.mark.parametrize(
    ("body", "param"),
    [({"replicas": [0, 7]}, "replicas"), ({"replicas": [0, 0]}, "replicas"), ({"replicas": [-1, 0]}, "replicas"),
     ({"replicas": "0,1"}, "replicas"), ({"replicas": [0, 10**30]}, "replicas"), ({"replica": [0]}, "replica")],
)
def test_a_drop_body_naming_no_real_replicas_is_400_before_the_coordinator(
    app: InProcessServer, coordinator_calls: list[tuple], body: dict, param: str
) -> None:
    assert_openai_error(post(app, "/v1/cluster/drop", body), 400, param)
    assert coordinator_calls == []


@pytest.mark.parametrize(("body", "param"), [({"group": -1}, "group"), ({"group": "first"}, "group"),
                                             ({"groups": 0}, "groups")])
def test_a_bad_restore_body_is_400_before_the_coordinator(
    app: InProcessServer, coordinator_calls: list[tuple], body: dict, param: str
) -> None:
    assert_openai_error(post(app, "/v1/cluster/restore", body), 400, param)
    assert coordinator_calls == []


def test_a_drop_the_clusters_state_refuses_now_is_a_409_conflict(app: InProcessServer) -> None:
    response = post(app, "/v1/cluster/drop", {})  # one replica: no group can be formed of it
    assert_openai_error(response, 409, "replicas")
    assert response.json()["error"]["type"] == "ConflictError" and "can form no group" in response.text


def test_a_drop_of_fewer_than_two_replicas_is_a_400_of_the_request(app: InProcessServer) -> None:
    response = post(app, "/v1/cluster/drop", {"replicas": [0]})
    assert_openai_error(response, 400, "replicas")
    assert "two or more" in response.text


def test_an_empty_operator_body_means_the_defaults(app: InProcessServer, coordinator_calls: list[tuple]) -> None:
    assert post(app, "/v1/cluster/restore", content=b"").status_code == 200
    assert coordinator_calls == [("restore", 0, "operator")]


# ---- a fault inside a step that concerns one request ----------------------------------------------


def test_a_fault_in_one_requests_output_fails_that_request_alone(
    app: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    faulty_prompt = [7, 8, 9]
    processor = app.engine.output_processor
    real = processor.check_stop

    def check_stop(seq: Sequence) -> str | None:
        if seq.prompt_token_ids == faulty_prompt:
            raise RuntimeError("injected fault")
        return real(seq)

    monkeypatch.setattr(processor, "check_stop", check_stop)
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(post, app, "/v1/completions", {**NORMAL, "max_tokens": 24})
        wait_until(lambda: bool(app.engine.scheduler.running), "the other request to run")
        failed = post(app, "/v1/completions", {**NORMAL, "prompt": faulty_prompt})
        assert_openai_error(failed, 500)
        assert "injected fault" in failed.json()["error"]["message"]
        assert other.result().json()["usage"]["completion_tokens"] == 24
    assert_serving(app)
    wait_until(lambda: not app.engine.has_unfinished_requests(), "the engine to go idle")
    assert app.engine.block_manager.num_free_blocks == app.engine.block_manager.num_total_blocks
