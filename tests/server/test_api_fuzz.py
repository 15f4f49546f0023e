"""A generated fuzz of the HTTP API on the real app and engine (the tiny model, in process).

Requests are drawn by hypothesis, seeded and derandomized so every run sends the same ones:
well-formed requests with plausible values, values of the wrong kind or range in any field
(64-bit overflows, NaN, lone surrogates, nesting), unknown fields and paths, wrong methods,
broken or oversized bodies, and every way of (not) giving the key. Specified: no response
is a 5xx, every error is in OpenAI's shape, no stream carries an error; afterwards the
server is healthy, holds no request or block, and answers a greedy request with the text
the offline engine gives.

KUNSERVE_API_FUZZ_EXAMPLES sets the number of requests (default 1,000, under a minute on
two cores); run with -s to see the tally of what was sent and answered."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from server_harness import InProcessServer, wait_until

from kunserve import LLM, SamplingParams
from kunserve.server.api_server import ServerConfig

MODEL = "tiny"
API_KEY = "fuzz-key"
MAX_MODEL_LEN = 48  # bounds the longest generation a fuzzed request can ask for
MAX_REQUEST_BYTES = 8 * 1024  # small, so that oversized bodies are cheap to send
NUM_EXAMPLES = int(os.environ.get("KUNSERVE_API_FUZZ_EXAMPLES", "1000"))
FUZZ_SEED = 22  # issue 22
OUT_OF_RANGE_INTS = [2**64, 2**64 - 1, -(2**63) - 1, -1, 0, 10**30, -(10**30)]
LONE_SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udc00x", "\ud83d"])


# ---- what a request is made of ------------------------------------------------------------------

clean_text = st.text(max_size=16)
text = st.one_of(clean_text, LONE_SURROGATES)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from(OUT_OF_RANGE_INTS),
    st.floats(allow_nan=True, allow_infinity=True), text,
)
# A value of any kind: what a field of another type receives.
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                    max_leaves=6)

VOCAB = 512  # the tiny model's
token_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10)
bad_token_ids = st.one_of(st.lists(st.sampled_from([-1, VOCAB, *OUT_OF_RANGE_INTS]), min_size=1, max_size=3),
                          st.just([]), st.lists(st.integers(0, 9), min_size=MAX_MODEL_LEN + 1, max_size=MAX_MODEL_LEN + 4))
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]),
     "content": st.one_of(clean_text, st.none(), st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                 "text": clean_text}), max_size=2))},
    optional={"name": clean_text},
)
bad_message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["tool", "developer", "wizard", ""]), text),
                                     "content": st.one_of(text, st.lists(st.fixed_dictionaries(
                                         {"type": st.sampled_from(["text", "image_url"]), "text": text})))})

# Per field: (usual values, in range; unusual values of the right type: edges, out of range). Any
# field may also get junk.
FIELDS: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]] = {
    "model": (st.sampled_from([MODEL, "alias"]), st.one_of(st.sampled_from(["gpt-4", ""]), LONE_SURROGATES)),
    # None and the huge ones are in range but ask for all of max_model_len: rare, as the slowest.
    "max_tokens": (st.integers(1, 4), st.sampled_from([0, -1, None, *OUT_OF_RANGE_INTS])),
    "temperature": (st.one_of(st.floats(0, 2), st.sampled_from([0.0, 1e-30, 1e38])),
                    st.one_of(st.floats(max_value=-1e-300), st.sampled_from([1e39, math.nan, math.inf]))),
    "top_p": (st.one_of(st.floats(0, 1, exclude_min=True), st.just(1e-50)),
              st.sampled_from([0.0, -0.1, 1.5, math.nan, math.inf])),
    "top_k": (st.integers(-1, VOCAB), st.sampled_from([-2, VOCAB + 1, *OUT_OF_RANGE_INTS])),
    "min_p": (st.floats(0, 1), st.sampled_from([-0.1, 1.1, math.nan])),
    "seed": (st.integers(0, 2**64 - 1), st.sampled_from([2**64, -1, -(2**63) - 1, 10**30])),
    "stop": (st.one_of(clean_text, st.lists(clean_text, max_size=3)), st.lists(LONE_SURROGATES, min_size=1)),
    "stop_token_ids": (st.lists(st.integers(0, VOCAB - 1), max_size=3), bad_token_ids),
    "stream": (st.booleans(), st.sampled_from(["yes", 2])),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), st.just({"include_usage": "x"})),
    "ignore_eos": (st.booleans(), st.just("often")),
    "skip_special_tokens": (st.booleans(), st.just([])),
    "include_stop_str_in_output": (st.booleans(), st.just({})),
    "user": (clean_text, LONE_SURROGATES),
    "n": (st.just(1), st.sampled_from([0, 2, 10**30])),
    "logprobs": (st.sampled_from([None, 0, False]), st.sampled_from([1, True, 5])),
    "presence_penalty": (st.sampled_from([0, 0.0]), st.sampled_from([0.5, -2.0])),
    "logit_bias": (st.just({}), st.just({"5": 1})),
    "response_format": (st.just({"type": "text"}), st.just({"type": "json_object"})),
}
COMPLETION_FIELDS = {
    **FIELDS,
    "prompt": (st.one_of(clean_text, token_ids, st.lists(clean_text, min_size=1, max_size=3),
                         st.lists(token_ids, min_size=1, max_size=3)),
               st.one_of(LONE_SURROGATES, bad_token_ids, st.just([[]]), st.lists(LONE_SURROGATES, min_size=1))),
}
CHAT_FIELDS = {
    **FIELDS,
    "messages": (st.lists(message, min_size=1, max_size=3),
                 st.one_of(st.just([]), st.lists(bad_message, min_size=1, max_size=2))),
    "max_completion_tokens": FIELDS["max_tokens"],
    "add_generation_prompt": (st.booleans(), st.just("maybe")),
}


@st.composite
def request_body(draw: st.DrawFn, fields: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]],
                 required: tuple[str, ...]) -> dict[str, Any]:
    """Every field usual; or one field unusual or of the wrong kind; or chaos (any field
    anything, unknown fields too)."""
    mode = draw(st.sampled_from(["usual"] * 9 + ["one unusual field"] * 8 + ["chaos"] * 3))
    if mode == "chaos":
        anything = {name: st.one_of(valid, invalid, junk) for name, (valid, invalid) in fields.items()}
        return {**draw(st.dictionaries(text, junk, max_size=2)), **draw(st.fixed_dictionaries({}, optional=anything))}
    body = draw(st.fixed_dictionaries({name: fields[name][0] for name in required},
                                      optional={name: valid for name, (valid, _) in fields.items()
                                                if name not in required}))
    if mode == "one unusual field":
        name = draw(st.sampled_from(sorted(fields)))
        body[name] = draw(st.one_of(fields[name][1], junk))
    return body


def completion_body() -> st.SearchStrategy:
    return request_body(COMPLETION_FIELDS, ("prompt", "max_tokens"))


def chat_body() -> st.SearchStrategy:
    return request_body(CHAT_FIELDS, ("messages", "max_tokens"))


operator_body = st.one_of(
    st.fixed_dictionaries({}, optional={"replicas": st.lists(st.integers(-1, 3), max_size=3),
                                        "group": st.integers(-1, 2)}),
    junk,
)


def encode(body: object) -> bytes:
    # allow_nan: the body may carry NaN and Infinity, which JSON has no words for.
    return json.dumps(body, allow_nan=True).encode()


@st.composite
def broken_bytes(draw: st.DrawFn) -> bytes:
    """A body that is not the JSON of an object: cut short, not UTF-8, nested past any limit,
    or larger than the server takes."""
    kind = draw(st.sampled_from(["cut", "bytes", "nested", "large"]))
    if kind == "cut":
        whole = encode(draw(completion_body()))
        return whole[: draw(st.integers(0, max(0, len(whole) - 1)))]
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "nested":
        depth = draw(st.integers(900, 5000))
        return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    return b'{"prompt": "' + b"a" * draw(st.integers(MAX_REQUEST_BYTES - 64, 2 * MAX_REQUEST_BYTES)) + b'"}'


GOOD_AUTH = {"Authorization": f"Bearer {API_KEY}"}
OTHER_AUTH = [{"Authorization": f"bearer {API_KEY}"}, {}, {"Authorization": "Bearer wrong"},
              {"Authorization": f"Basic {API_KEY}"}]
auth = st.one_of(
    *[st.just(GOOD_AUTH)] * 12, *map(st.just, OTHER_AUTH),
    st.builds(lambda value: {"Authorization": value}, st.text(st.characters(min_codepoint=32, max_codepoint=126))),
)


@st.composite
def api_request(draw: st.DrawFn) -> tuple[str, str, bytes | None, dict[str, str]]:
    """(method, path, body, headers)."""
    headers = draw(auth)
    route = draw(st.sampled_from(["completions"] * 4 + ["chat"] * 3 + ["broken", "operator", "get", "elsewhere"]))
    if route == "completions":
        return "POST", "/v1/completions", encode(draw(completion_body())), headers
    if route == "chat":
        return "POST", "/v1/chat/completions", encode(draw(chat_body())), headers
    if route == "broken":
        path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/cluster/drop"]))
        return "POST", path, draw(broken_bytes()), headers
    if route == "operator":
        path = draw(st.sampled_from(["/v1/cluster/drop", "/v1/cluster/restore"]))
        return "POST", path, encode(draw(operator_body)), headers
    if route == "get":
        path = draw(st.sampled_from(["/v1/models", "/v1/cluster", "/health", "/version", "/metrics"]))
        return "GET", path, None, headers
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    path = draw(st.one_of(st.sampled_from(["/v1/completions", "/v1/models", "/v2/completions", "/"]),
                          st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=12).map("/".__add__)))
    return method, path, draw(st.one_of(st.none(), st.builds(encode, junk))), headers


# ---- the server under fuzz ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(llama_dir: Path) -> Iterator[InProcessServer]:
    config = ServerConfig(api_key=API_KEY, served_model_names=[MODEL, "alias"], max_request_bytes=MAX_REQUEST_BYTES)
    server = InProcessServer(llama_dir, config, max_model_len=MAX_MODEL_LEN)
    yield server
    server.stop()


def check_response(response: httpx.Response, tally: Counter[str]) -> None:
    tally[f"{response.status_code // 100}xx"] += 1
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == response.status_code
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert not any('"error"' in event and "choices" not in event for event in events), response.text


def test_fuzzed_requests_get_no_5xx_and_leave_the_server_serving(app: InProcessServer, llama_dir: Path) -> None:
    tally: Counter[str] = Counter()

    @seed(FUZZ_SEED)
    @settings(max_examples=NUM_EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(api_request())
    def send(request: tuple[str, str, bytes | None, dict[str, str]]) -> None:
        method, path, body, headers = request
        tally["tried"] += 1
        check_response(app.client.request(method, path, content=body, headers=headers), tally)

    send()
    print(f"\napi fuzz: {tally['tried']} requests tried: {tally['2xx']} 2xx, {tally['4xx']} 4xx, {tally['5xx']} 5xx")
    assert tally["tried"] >= NUM_EXAMPLES

    assert app.client.get("/health").status_code == 200
    engine = app.engine
    wait_until(lambda: not engine.has_unfinished_requests(), "every fuzzed request to leave the engine")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
    greedy = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
    answer = app.client.post("/v1/completions", json=greedy, headers=GOOD_AUTH)
    offline = LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN)
    expected = offline.generate(greedy["prompt"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert answer.json()["choices"][0]["text"] == expected[0].outputs[0].text
