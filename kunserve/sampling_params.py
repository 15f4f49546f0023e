"""Per-request sampling settings, named and validated as in vLLM's SamplingParams.

Every field is checked against what the engine can hold (the sampler's float32 settings,
torch's 64-bit generator seeds), so no request can fail inside a step: a bad value is a
ValueError naming the field, which the server answers with 400."""

from __future__ import annotations

import enum
import math
import numbers
import operator
from dataclasses import dataclass, field

import numpy as np

SEED_LIMIT = 2**64  # torch.Generator seeds are unsigned 64-bit integers
MAX_TEMPERATURE = float(np.finfo(np.float32).max)  # the sampler divides logits by it in float32
# The sampler holds top_p in float32, where a smaller one is 0 and would cut every token; any
# top_p this small keeps the top token alone, as this one does.
MIN_TOP_P = float(np.finfo(np.float32).tiny)
# Below this temperature sampling is greedy but for float rounding, and dividing logits by it
# would overflow float32: such requests are greedy (as in vLLM).
GREEDY_TEMPERATURE = 1e-5


class RequestOutputKind(enum.Enum):
    """What a running request's outputs carry, as in vLLM."""

    CUMULATIVE = "cumulative"  # every step: all tokens and text so far
    DELTA = "delta"  # every step: only what is new since the last output (streaming)
    FINAL_ONLY = "final_only"  # one output, when the request finishes (offline batches)


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        self.temperature = _finite("temperature", self.temperature)
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature: must be in [0, {MAX_TEMPERATURE:.4g}], got {self.temperature}")
        if self.temperature < GREEDY_TEMPERATURE:
            self.temperature = 0.0
        self.top_p = _finite("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        self.top_p = max(self.top_p, MIN_TOP_P)
        self.top_k = _integer("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k: must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        self.min_p = _finite("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p: must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            self.seed = _integer("seed", self.seed)
            if not 0 <= self.seed < SEED_LIMIT:
                raise ValueError(f"seed: must be in [0, 2**64), got {self.seed}")
        if self.max_tokens is not None:
            self.max_tokens = _integer("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) for s in self.stop or []):
            raise ValueError(f"stop: must be a string or a list of strings, got {self.stop!r}")
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = [_integer("stop_token_ids", t) for t in self.stop_token_ids]
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: token ids must be >= 0, got {self.stop_token_ids}")

    def validate_for_vocabulary(self, vocab_size: int) -> None:
        """Checks what depends on the model: top_k and stop_token_ids within its vocabulary."""
        if self.top_k > vocab_size:
            raise ValueError(f"top_k: must be at most the vocabulary size {vocab_size}, got {self.top_k}")
        outside = [t for t in self.stop_token_ids if t >= vocab_size]
        if outside:
            raise ValueError(f"stop_token_ids: {outside[:5]} are outside the vocabulary [0, {vocab_size})")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def _finite(name: str, value: float) -> float:
    """`value` as a float; ValueError naming `name` unless a finite real number (bools are not)."""
    number = math.nan
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    return number


def _integer(name: str, value: int) -> int:
    """`value` as an int; ValueError naming `name` unless an integer (bools are not)."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None:
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    return number
