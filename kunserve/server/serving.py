"""OpenAI completions and chat completions on the async engine: requests become sampling
params and engine requests; engine outputs become JSON responses or server-sent events
(one event per generated token, then `data: [DONE]`)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError, TemplateSyntaxError
from transformers import PreTrainedTokenizerBase

from kunserve.cluster.cluster import Cluster
from kunserve.engine.async_engine import EngineDeadError, EngineOverloadedError, RequestStream
from kunserve.outputs import RequestOutput
from kunserve.sampling_params import RequestOutputKind, SamplingParams
from kunserve.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingRequest

# Our ValueErrors start with the offending field's name: "top_p: must be in (0, 1]".
_FIELD_PREFIX = re.compile(r"^(\w+): ")
CLIENT_CLOSED_STATUS = 499  # the client went away before the response was ready (nginx's code)


@dataclass
class _Choices:
    """Per-choice bookkeeping of one HTTP request: a choice per prompt."""

    index_of: dict[str, int]
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    completion_tokens: dict[str, int] = field(default_factory=dict)

    def count(self, out: RequestOutput) -> None:
        self.prompt_tokens[out.request_id] = len(out.prompt_token_ids)
        self.completion_tokens[out.request_id] = (
            self.completion_tokens.get(out.request_id, 0) + len(out.outputs[0].token_ids)
        )

    def usage(self) -> dict[str, int]:
        prompt, completion = sum(self.prompt_tokens.values()), sum(self.completion_tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class OpenAIServing:
    def __init__(
        self,
        engine: Cluster,
        served_model_names: list[str],
        tokenizer: PreTrainedTokenizerBase | None,
        max_model_len: int,
        retry_after_s: int,
        on_queue_full: Callable[[], None],
    ) -> None:
        """Prompts are tokenized here, off the event loop (`asyncio.to_thread`): a long text
        takes seconds to tokenize, and the loop must keep serving meanwhile."""
        self.engine = engine
        self.served_model_names = served_model_names
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.retry_after_s = retry_after_s
        self.on_queue_full = on_queue_full

    # ---- endpoints ----------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        model = self._check(body)
        params = self._sampling_params(body, body.max_tokens)
        prompts = await asyncio.to_thread(self._completion_token_ids, body.prompt)
        base_id = f"cmpl-{uuid.uuid4().hex}"
        stream = self._start(base_id, prompts, params)
        choices = _Choices({rid: i for i, rid in enumerate(stream.request_ids)})
        header = {"id": base_id, "object": "text_completion", "created": int(time.time()), "model": model}

        def choice(out: RequestOutput) -> dict[str, Any]:
            c = out.outputs[0]
            return {"index": choices.index_of[out.request_id], "text": c.text, "logprobs": None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

        if body.stream:
            events = self._events(stream, request, choices, lambda out: [{**header, "choices": [choice(out)]}],
                                  header, body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        finals = await self._collect(stream, request, choices)
        return JSONResponse({**header, "choices": [choice(out) for out in finals], "usage": choices.usage()})

    async def chat(self, body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        model = self._check(body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = self._sampling_params(body, max_tokens)
        prompt = await asyncio.to_thread(self._chat_prompt, body)
        base_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = self._start(base_id, [prompt], params)
        choices = _Choices({stream.request_ids[0]: 0})
        header = {"id": base_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        started: set[str] = set()

        def chunks(out: RequestOutput) -> list[dict[str, Any]]:
            c = out.outputs[0]
            index = choices.index_of[out.request_id]
            first = []
            if out.request_id not in started:  # as vLLM: the role comes once the first token exists
                started.add(out.request_id)
                first = [{**header, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]}]
            delta = {"index": index, "delta": {"content": c.text}, "logprobs": None,
                     "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            return [*first, {**header, "choices": [delta]}]

        if body.stream:
            events = self._events(stream, request, choices, chunks, header, body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        out = (await self._collect(stream, request, choices))[0]
        c = out.outputs[0]
        message = {"role": "assistant", "content": c.text}
        answer = {"index": 0, "message": message, "logprobs": None, "finish_reason": c.finish_reason,
                  "stop_reason": c.stop_reason}
        return JSONResponse({**header, "object": "chat.completion", "choices": [answer], "usage": choices.usage()})

    # ---- requests in ----------------------------------------------------------------------------

    def _check(self, body: SamplingRequest) -> str:
        """The served model name the request is for; refuses unknown models and fields."""
        model = body.model or self.served_model_names[0]
        if model not in self.served_model_names:
            raise APIError(404, f"The model `{model}` does not exist.", "model")
        unsupported = body.unsupported_field()
        if unsupported is not None:
            raise APIError(400, f"{unsupported}: kunserve does not implement this field's non-default values",
                           unsupported)
        return model

    def _sampling_params(self, body: SamplingRequest, max_tokens: int | None) -> SamplingParams:
        kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
        try:
            return SamplingParams(
                temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, seed=body.seed,
                max_tokens=max_tokens, stop=body.stop, stop_token_ids=body.stop_token_ids,
                ignore_eos=body.ignore_eos, include_stop_str_in_output=body.include_stop_str_in_output,
                skip_special_tokens=body.skip_special_tokens, output_kind=kind,
            )
        except ValueError as error:
            raise _bad_request(error) from None

    def _completion_token_ids(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """Each prompt's token ids (runs off the event loop)."""
        return [self._within_max_model_len(self._token_ids(p)) for p in _completion_prompts(prompt)]

    def _token_ids(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return prompt
        if self.tokenizer is None:
            raise APIError(400, "prompt: text prompts need a tokenizer; pass token ids instead", "prompt")
        return self.tokenizer.encode(prompt)

    def _within_max_model_len(self, token_ids: list[int]) -> list[int]:
        # The engine checks this too, but on the event loop, after a pass over every id.
        if len(token_ids) > self.max_model_len:
            raise APIError(400, f"prompt: {len(token_ids)} tokens is longer than max_model_len={self.max_model_len}",
                           "prompt")
        return token_ids

    def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        """The conversation's token ids through the tokenizer's chat template (runs off the event loop)."""
        if self.tokenizer is None:
            raise APIError(400, "messages: the model has no tokenizer, so chat is unavailable", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=body.add_generation_prompt
            )
        except TemplateSyntaxError:  # the model's template is broken: no fault of the request
            raise
        except (ValueError, TemplateError) as error:  # no chat template; the template refuses the messages
            raise APIError(400, f"messages: {error}", "messages") from None
        # The template writes any special tokens (bos) itself.
        return self._within_max_model_len(self.tokenizer.encode(text, add_special_tokens=False))

    def _start(self, base_id: str, prompts: list[list[int]], params: SamplingParams) -> RequestStream:
        request_ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        try:
            return self.engine.add_requests(request_ids, prompts, [params] * len(prompts))
        except ValueError as error:
            raise _bad_request(error) from None
        except EngineOverloadedError as error:
            self.on_queue_full()
            raise APIError(503, str(error), headers={"Retry-After": str(self.retry_after_s)}) from None
        except EngineDeadError as error:
            raise APIError(500, str(error)) from None

    # ---- outputs out ----------------------------------------------------------------------------

    async def _collect(self, stream: RequestStream, request: Request, choices: _Choices) -> list[RequestOutput]:
        """The finished outputs in choice order; the requests are aborted if the client leaves."""
        finals: dict[str, RequestOutput] = {}
        with stream:
            watcher = asyncio.create_task(_close_on_disconnect(request, stream))
            try:
                async for out in stream:
                    _raise_if_failed(out)
                    choices.count(out)
                    finals[out.request_id] = out
            except EngineDeadError as error:
                raise APIError(500, str(error)) from None
            finally:
                watcher.cancel()
        if len(finals) < len(choices.index_of):
            raise APIError(CLIENT_CLOSED_STATUS, "the client closed the connection")
        return sorted(finals.values(), key=lambda out: choices.index_of[out.request_id])

    async def _events(
        self,
        stream: RequestStream,
        request: Request,
        choices: _Choices,
        chunks_of: Callable[[RequestOutput], list[dict[str, Any]]],
        header: dict[str, Any],
        include_usage: bool,
    ) -> AsyncIterator[str]:
        with stream:
            watcher = asyncio.create_task(_close_on_disconnect(request, stream))
            try:
                async for out in stream:
                    _raise_if_failed(out)
                    choices.count(out)
                    for chunk in chunks_of(out):
                        yield _event(chunk)
                if include_usage and not stream.closed:
                    yield _event({**header, "choices": [], "usage": choices.usage()})
            except EngineDeadError as error:
                yield _event(APIError(500, str(error)).body())
            except APIError as error:
                yield _event(error.body())
            finally:
                watcher.cancel()
        yield "data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _close_on_disconnect(request: Request, stream: RequestStream) -> None:
    """Close (abort) the stream as soon as the client disconnects, whether or not a token is
    being sent at that moment; the body was read already, so the next message is the end."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stream.close()


def _raise_if_failed(out: RequestOutput) -> None:
    """A request the engine failed alone (a fault in its own output) is this response's 500."""
    if out.error is not None:
        raise APIError(500, f"the request failed: {out.error}")


def _completion_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def _bad_request(error: ValueError) -> APIError:
    message = str(error)
    match = _FIELD_PREFIX.match(message)
    return APIError(400, message, match.group(1) if match else None)
