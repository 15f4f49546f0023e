"""The OpenAI API's request bodies (with vLLM's sampling extras) and error body.

Unknown fields are accepted and logged, as vLLM does, so clients that send newer fields
keep working; fields kunserve does not implement are refused when set to anything but
their neutral value, rather than silently ignored."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`."""

    TYPES: ClassVar[dict[int, str]] = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 500: "InternalServerError",
             503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        error_type = self.TYPES.get(self.status, "APIError")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.status}}


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
    replicas: list[int] | None = None  # None: the first replicas in replica mode, a group's worth


class RestoreRequest(BaseModel):
    group: int = 0
