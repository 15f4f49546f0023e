"""The OpenAI-compatible server, driven over loopback by the official `openai` client (and by
plain httpx where a client must misbehave: malformed JSON, no key, a dropped connection).

Specified: completions and chat answer what the offline engine answers; streams carry one
token per event and end in `[DONE]`; every bad input gets OpenAI's error shape with the
right status; /openapi.json documents every request body; /metrics parses and moves; a client that leaves has its request aborted and
its blocks freed; `kunserve bench` agrees with the server's own histograms."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from server_harness import MAX_MODEL_LEN, RunningServer, scrape, wait_until

from kunserve import LLM, SamplingParams
from kunserve.cli import main
from kunserve.server.api_server import ServerConfig

MODEL = "tiny"
API_KEY = "test-key"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server(llama_dir: Path) -> Iterator[RunningServer]:
    running = RunningServer(llama_dir, ServerConfig(api_key=API_KEY, served_model_names=[MODEL, "alias"]))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN)


def greedy(max_tokens: int, **extra: object) -> dict:
    return {"model": MODEL, "temperature": 0.0, "max_tokens": max_tokens, "extra_body": {"ignore_eos": True, **extra}}


# ---- completions and chat -------------------------------------------------------------------


def test_completion_matches_the_offline_engine_and_reports_usage(client: openai.OpenAI, offline: LLM) -> None:
    answer = client.completions.create(prompt=PROMPT, **greedy(8))
    expected = offline.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert answer.choices[0].text == expected.outputs[0].text
    assert answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(expected.prompt_token_ids), 8)


def test_completion_takes_a_list_of_prompts_as_choices_in_order(client: openai.OpenAI) -> None:
    one = [client.completions.create(prompt=p, **greedy(4)).choices[0].text for p in ("Hello", "The sky")]
    both = client.completions.create(prompt=["Hello", "The sky"], **greedy(4))
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == one
    assert both.usage.completion_tokens == 8


def test_completion_takes_token_id_prompts(client: openai.OpenAI, offline: LLM) -> None:
    ids = [5, 17, 42, 99]
    answer = client.completions.create(prompt=ids, **greedy(6))
    expected = offline.generate([ids], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert answer.choices[0].text == expected.outputs[0].text
    assert answer.usage.prompt_tokens == len(ids)


def test_chat_applies_the_tokenizer_chat_template(client: openai.OpenAI, offline: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    answer = client.chat.completions.create(messages=messages, **greedy(8))
    tokenizer = offline.get_tokenizer()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    expected = offline.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected.outputs[0].text
    assert answer.usage.prompt_tokens == len(prompt_ids)


def test_models_lists_every_served_name(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL, "alias"]


@pytest.mark.parametrize("path, body, field", [("/v1/completions", "CompletionRequest", "prompt"),
                                               ("/v1/chat/completions", "ChatCompletionRequest", "messages"),
                                               ("/v1/cluster/drop", "DropRequest", "replicas")])
def test_openapi_documents_each_request_body(server: RunningServer, path: str, body: str, field: str) -> None:
    document = httpx.get(f"{server.url}/openapi.json").json()
    content = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    assert content["schema"] == {"$ref": f"#/components/schemas/{body}"}
    assert field in document["components"]["schemas"][body]["properties"]


def test_every_reference_in_the_openapi_document_resolves(server: RunningServer) -> None:
    document = httpx.get(f"{server.url}/openapi.json").json()
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(document))
    assert "ChatMessage" in refs and set(refs) <= set(document["components"]["schemas"])


def test_health_is_ok_while_the_engine_runs(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200


# ---- streaming ------------------------------------------------------------------------------


def test_stream_carries_one_token_per_event_and_the_same_text(client: openai.OpenAI) -> None:
    whole = client.completions.create(prompt=PROMPT, **greedy(12)).choices[0].text
    chunks = list(client.completions.create(prompt=PROMPT, stream=True, stream_options={"include_usage": True},
                                            **greedy(12)))
    token_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert len(token_chunks) == 12
    assert "".join(c.choices[0].text for c in token_chunks) == whole
    assert [c.choices[0].finish_reason for c in token_chunks] == [None] * 11 + ["length"]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 12


def test_stream_delivers_tokens_while_the_request_still_runs(client: openai.OpenAI, server: RunningServer) -> None:
    stream = client.completions.create(prompt=PROMPT, stream=True, **greedy(MAX_MODEL_LEN - 16))
    first = next(iter(stream))
    still_running = [s.request_id for s in server.engine.scheduler.running]
    stream.close()
    assert first.choices[0].text is not None
    assert any(request_id.startswith(first.id) for request_id in still_running)


def test_chat_stream_sends_the_role_first_then_the_content(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(messages=messages, **greedy(10)).choices[0].message.content
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **greedy(10)))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_stop_string_never_reaches_the_stream(client: openai.OpenAI) -> None:
    text = client.completions.create(prompt=PROMPT, **greedy(40)).choices[0].text
    stop = text[12:15]
    expected = text[: text.find(stop)]
    streamed = [c.choices[0].text for c in client.completions.create(prompt=PROMPT, stream=True, stop=[stop],
                                                                     **greedy(40))]
    assert "".join(streamed) == expected
    assert all(stop not in piece for piece in streamed)


def test_64_concurrent_streams_all_complete(server: RunningServer) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, str | None]:
        stream = await client.completions.create(prompt=f"Request {i}:", stream=True, **greedy(16))
        chunks = [chunk async for chunk in stream]
        return len(chunks), chunks[-1].choices[0].finish_reason

    async def run() -> list[tuple[int, str | None]]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    assert asyncio.run(run()) == [(16, "length")] * 64


# ---- bad input and faults -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -1.0), ("top_p", 2.0), ("max_tokens", 0), ("n", 2), ("presence_penalty", 0.5)],
)
def test_an_invalid_field_is_400_naming_the_field(client: openai.OpenAI, field: str, value: object) -> None:
    args = {**greedy(4), field: value}
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(prompt=PROMPT, **args)
    assert raised.value.status_code == 400
    assert raised.value.body["param"] == field and field in raised.value.body["message"]


def test_a_wrongly_typed_field_is_400_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(prompt=PROMPT, model=MODEL, extra_body={"ignore_eos": "often"})
    assert raised.value.body["param"] == "ignore_eos"


def test_a_prompt_over_max_model_len_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(prompt=[7] * (MAX_MODEL_LEN + 1), **greedy(4))
    assert raised.value.body["param"] == "prompt" and "max_model_len" in raised.value.body["message"]


def test_restoring_with_no_group_is_a_conflict_saying_groups_restore_themselves(server: RunningServer) -> None:
    response = httpx.post(f"{server.url}/v1/cluster/restore", json={"group": 0},
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 409 and response.json()["error"]["type"] == "ConflictError"
    assert "no pipeline group" in response.json()["error"]["message"]
    assert "--restore-after-s" in response.json()["error"]["message"]


def test_malformed_json_is_400(server: RunningServer) -> None:
    response = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "x",',
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_a_wrong_api_key_is_401(server: RunningServer) -> None:
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.completions.create(prompt=PROMPT, **greedy(4))
    assert raised.value.status_code == 401 and raised.value.body["code"] == 401


def test_a_missing_api_key_is_401(server: RunningServer) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": PROMPT})
    assert response.status_code == 401 and "API key" in response.json()["error"]["message"]


def test_an_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(prompt=PROMPT, **{**greedy(4), "model": "gpt-17"})
    assert raised.value.status_code == 404 and raised.value.body["param"] == "model"


def test_the_server_keeps_serving_after_bad_input(server: RunningServer, client: openai.OpenAI) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    bad_bodies = [b"[]", b"null", b'{"prompt": []}', b'{"prompt": [[1, 2], "x"]}', b'{"prompt": "x", "stop": 3}',
                  b'{"prompt": [999999999]}', b'{"messages": []}', b"\xff\xfe"]
    statuses = {httpx.post(f"{server.url}/v1/completions", content=body, headers=headers).status_code
                for body in bad_bodies}
    assert statuses == {400}
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert client.completions.create(prompt=PROMPT, **greedy(3)).usage.completion_tokens == 3


def test_a_full_waiting_queue_is_503_with_retry_after(llama_dir: Path) -> None:
    busy = RunningServer(llama_dir, ServerConfig(max_waiting_requests=1, retry_after_s=7), max_num_seqs=1)

    async def one(client: openai.AsyncOpenAI) -> str:
        try:
            await client.completions.create(prompt=PROMPT, model=str(llama_dir), temperature=0.0, max_tokens=64,
                                            extra_body={"ignore_eos": True})
            return "served"
        except openai.InternalServerError as error:
            assert error.status_code == 503 and error.response.headers["retry-after"] == "7"
            return "refused"

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{busy.url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client) for _ in range(8)))

    try:
        outcomes = asyncio.run(run())
    finally:
        busy.stop()
    assert "refused" in outcomes and "served" in outcomes


def test_a_client_that_disconnects_has_its_request_aborted_and_blocks_freed(
    server: RunningServer, client: openai.OpenAI
) -> None:
    before = scrape(server)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_MODEL_LEN - 16, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        events = response.iter_lines()
        assert next(events).startswith("data: ")
    engine = server.engine
    wait_until(lambda: not engine.scheduler.has_unfinished, "the aborted request to leave the scheduler")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
    aborted = 'vllm:request_success_total{finished_reason="abort"}'
    wait_until(lambda: scrape(server).get(aborted, 0) == before.get(aborted, 0) + 1, "the abort to be counted")
    assert client.completions.create(prompt=PROMPT, **greedy(3)).usage.completion_tokens == 3


# ---- metrics --------------------------------------------------------------------------------

VLLM_METRICS = (
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds_count", "vllm:time_per_output_token_seconds_count",
    "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
)


def test_metrics_parse_and_name_every_vllm_metric(server: RunningServer) -> None:
    names = {key.split("{")[0] for key in scrape(server)}
    assert set(VLLM_METRICS) <= names


def test_metrics_counters_move_as_requests_are_served(server: RunningServer, client: openai.OpenAI) -> None:
    before = scrape(server)
    usage = client.completions.create(prompt=PROMPT, **greedy(9)).usage
    after = scrape(server)

    def moved(name: str) -> float:
        return after[name + "{}"] - before.get(name + "{}", 0.0)

    assert moved("vllm:prompt_tokens_total") == usage.prompt_tokens
    assert moved("vllm:generation_tokens_total") == 9
    assert moved("vllm:time_to_first_token_seconds_count") == 1
    assert moved("vllm:time_per_output_token_seconds_count") == 8
    assert moved("vllm:e2e_request_latency_seconds_count") == 1
    assert moved("vllm:request_queue_time_seconds_count") == 1
    length = 'vllm:request_success_total{finished_reason="length"}'
    assert after[length] - before.get(length, 0.0) == 1


# ---- the bench client -----------------------------------------------------------------------


def test_bench_reports_every_metric_and_agrees_with_the_server(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    main(["bench", "--base-url", server.url, "--api-key", API_KEY, "--model", MODEL, "--num-prompts", "12",
          "--request-rate", "50", "--input-len", "24", "--output-len", "6", "--slo-ttft-ms", "60000",
          "--slo-tpot-ms", "60000", "--no-progress", "--out", str(out)])
    summary = json.loads(out.read_text())["summary"]
    assert "ttft" in capsys.readouterr().out
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert {"count", "mean", "p50", "p90", "p99"} <= set(summary[metric])
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert summary["output_throughput"] > 0 and summary["slo_attainment"] == 1.0
    server_side = summary["server"]
    assert server_side["vllm:time_to_first_token_seconds"]["count"] == summary["ttft_ms"]["count"] == 12
    assert server_side["vllm:inter_token_latency_seconds"]["count"] == summary["itl_ms"]["count"] == 12 * 5
    assert server_side["vllm:request_time_per_output_token_seconds"]["count"] == summary["tpot_ms"]["count"] == 12
    assert server_side["vllm:e2e_request_latency_seconds"]["count"] == summary["e2e_ms"]["count"] == 12
    assert server_side["vllm:generation_tokens_total"]["value"] == summary["total_output_tokens"] == 12 * 6
    assert server_side["vllm:prompt_tokens_total"]["value"] == summary["total_prompt_tokens"] == 12 * 24


def test_bench_of_prompts_over_max_model_len_fails_naming_the_flag(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--base-url", server.url, "--api-key", API_KEY, "--model", MODEL, "--num-prompts", "2",
              "--input-len", str(MAX_MODEL_LEN + 1), "--output-len", "3", "--no-progress"])
    assert exited.value.code != 0
    assert f"--max-model-len {MAX_MODEL_LEN + 4}" in caplog.text
