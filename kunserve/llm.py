"""Offline batch generation with vLLM's interface: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as Seq
from typing import Any

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase
from typing_extensions import Self

from kunserve.config import EngineConfig
from kunserve.engine.llm_engine import LLMEngine, PromptInput
from kunserve.outputs import RequestOutput
from kunserve.sampling_params import RequestOutputKind, SamplingParams

# What `generate` accepts as prompts: one prompt or a list of them; a prompt is text, a list
# of token ids, or vLLM's dict forms {"prompt": str} / {"prompt_token_ids": list[int]}.
Prompts = str | list[int] | dict[str, Any] | Seq[str | list[int] | dict[str, Any]]


class LLM:
    """An engine for offline generation. Its devices' memory and worker processes are freed
    by `shutdown()`, at the end of a `with LLM(...) as llm:` block, or once the LLM is deleted
    and nothing else holds its engine (`del llm`): another LLM of the same process then finds
    the memory free, as vLLM's users expect."""

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self._engine: LLMEngine | None = LLMEngine(EngineConfig(model=model, **engine_args))
        self._ids = itertools.count()

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            raise RuntimeError("LLM: shut down; make a new LLM to generate again")
        return self._engine

    def shutdown(self) -> None:
        """Free the engine's device memory (arena, CUDA graphs, cached blocks) and stop its
        worker processes. Further calls do nothing; generating afterwards raises."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def get_tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompts,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order. Bad input raises
        ValueError before any request is queued."""
        prompt_list = _normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompt_list) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        )
        if len(params_list) != len(prompt_list):
            raise ValueError(f"sampling_params: {len(params_list)} given for {len(prompt_list)} prompts")
        # Only finished outputs are collected: skip building per-step ones.
        params_list = [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params_list]
        engine = self.engine
        ids = [str(next(self._ids)) for _ in prompt_list]
        seqs = [engine.make_sequence(rid, p, params) for rid, p, params in zip(ids, prompt_list, params_list)]
        for seq in seqs:
            engine.add_sequence(seq)
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    results[out.request_id] = out
                    bar.update(1)
        return [results[rid] for rid in ids]


def _normalize_prompts(prompts: Prompts) -> list[PromptInput]:
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]  # type: ignore[list-item]
    out: list[PromptInput] = []
    for p in prompts:
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                out.append(list(p["prompt_token_ids"]))
            elif "prompt" in p:
                out.append(str(p["prompt"]))
            else:
                raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(p, str):
            out.append(p)
        else:
            out.append(list(p))
    return out
