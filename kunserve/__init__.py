"""kunserve: LLM serving that manages parameters, not only KV cache, as memory."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kunserve.config import EngineConfig
    from kunserve.engine.llm_engine import LLMEngine
    from kunserve.llm import LLM
    from kunserve.outputs import CompletionOutput, RequestOutput
    from kunserve.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

# Imported on first use, so that a worker process, which needs none of them, starts faster.
_HOMES = {
    "LLM": "kunserve.llm",
    "CompletionOutput": "kunserve.outputs",
    "EngineConfig": "kunserve.config",
    "LLMEngine": "kunserve.engine.llm_engine",
    "RequestOutput": "kunserve.outputs",
    "SamplingParams": "kunserve.sampling_params",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'kunserve' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
