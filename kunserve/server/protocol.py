"""The OpenAI API's request bodies (with vLLM's sampling extras) and error body, and how a
body is parsed: strict UTF-8 JSON, every string valid Unicode, then pydantic's validation.

Unknown fields are accepted and logged, as vLLM does, so clients that send newer fields
keep working; fields kunserve does not implement are refused when set to anything but
their neutral value, rather than silently ignored."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowedError",
        409: "ConflictError", 413: "RequestTooLargeError", 500: "InternalServerError", 503: "ServiceUnavailableError",
    }

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        error_type = self.TYPES.get(self.status, "APIError")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.status}}


Body = TypeVar("Body", bound=BaseModel)


def parse_body(model: type[Body], body: bytes) -> Body:
    """`body` as a `model`; APIError(400) saying what is wrong (the field, where there is one).
    JSON as RFC 8259 has it: UTF-8, no NaN or Infinity; strings must be valid Unicode (JSON's
    escapes can spell a lone surrogate, which no tokenizer or response can encode)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise APIError(400, f"malformed JSON body: not UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise APIError(400, "malformed JSON body: nested too deeply") from None
    except ValueError as error:  # bad syntax, NaN or Infinity, an integer of too many digits
        raise APIError(400, f"malformed JSON body: {error}") from None
    _refuse_lone_surrogates(data)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _validation_error(error) from None


def _validation_error(error: ValidationError) -> APIError:
    """The 400 of pydantic's first validation error, naming its field."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    return APIError(400, f"{param or 'body'}: {first['msg']}", param)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _refuse_lone_surrogates(data: object) -> None:
    """APIError(400) naming the first field (or key) that holds an unpaired UTF-16 surrogate."""
    pending: list[tuple[object, tuple[str | int, ...]]] = [(data, ())]
    while pending:  # not recursive: the JSON may nest as deep as the parser allows
        value, path = pending.pop()
        if isinstance(value, str):
            _check_unicode(value, path, "")
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_unicode(key, path, "a key of ")
                pending.append((item, (*path, key)))
        elif isinstance(value, list):
            pending.extend((item, (*path, index)) for index, item in enumerate(value))


def _check_unicode(text: str, path: tuple[str | int, ...], what: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        param = ".".join(str(part) for part in path) or None
        raise APIError(400, f"{what}{param or 'the body'}: a lone surrogate (an unpaired \\ud800-\\udfff escape) "
                       "is not valid Unicode", param) from None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields that completions and chat share."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None  # None: the first served model name
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # vLLM's extras.
    top_k: int = 0
    min_p: float = 0.0
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    # Implemented only at these values: anything else is refused with 400.
    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        "n": (1,),
        "best_of": (None, 1),
        "echo": (None, False),
        "logprobs": (None, False, 0),
        "top_logprobs": (None, 0),
        "presence_penalty": (None, 0, 0.0),
        "frequency_penalty": (None, 0, 0.0),
        "repetition_penalty": (None, 1, 1.0),
        "logit_bias": (None, {}),
        "suffix": (None, ""),
        "min_tokens": (None, 0),
        "tools": (None, []),
        "response_format": (None, {"type": "text"}),
    }

    def unsupported_field(self) -> str | None:
        """The first field set to a value kunserve does not implement, if any."""
        values = {**(self.model_extra or {}), "n": self.n}
        for name, neutral in self.NEUTRAL.items():
            if name in values and values[name] not in neutral:
                return name
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    add_generation_prompt: bool = True


class DropRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an operator's typo must not drop the default members

    replicas: list[int] | None = None  # None: the first replicas in replica mode, a group's worth


class RestoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group: int = Field(default=0, ge=0)
