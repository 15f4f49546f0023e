"""kunserve: LLM serving that manages parameters, not only KV cache, as memory."""

from kunserve.config import EngineConfig
from kunserve.engine.llm_engine import LLMEngine
from kunserve.llm import LLM
from kunserve.outputs import CompletionOutput, RequestOutput
from kunserve.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
