"""The engine of one replica: requests in, scheduled steps out to the executor, tokens back."""

from __future__ import annotations

import logging
import time

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from kunserve.config import EngineConfig
from kunserve.engine.block_manager import BlockManager
from kunserve.engine.detokenizer import IncrementalDetokenizer
from kunserve.engine.scheduler import Scheduler
from kunserve.engine.sequence import Sequence
from kunserve.executor.base import Executor
from kunserve.executor.in_process import InProcessExecutor
from kunserve.model.presets import ResolvedModel, resolve_model
from kunserve.model.spec import parse_dtype
from kunserve.model.weights import CheckpointWeights, DummyWeights, WeightSource
from kunserve.outputs import CompletionOutput, RequestOutput
from kunserve.sampling_params import SamplingParams
from kunserve.step import build_step_input
from kunserve.worker.worker import Worker

logger = logging.getLogger(__name__)

PromptInput = str | list[int]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        model = resolve_model(config.model)
        self.model = model
        self.spec = model.spec
        self.tokenizer = self._load_tokenizer(model)
        self.max_model_len = config.max_model_len or self.spec.max_position_embeddings
        self.executor = self._build_executor(model)
        layout = self.executor.layout
        self.block_manager = BlockManager(config.block_size, layout.initial_kv_blocks())
        capacity = self.block_manager.num_total_blocks * config.block_size
        if capacity < self.max_model_len:
            logger.warning(
                "the KV cache holds %d tokens, less than max_model_len=%d: longer requests will be refused",
                capacity,
                self.max_model_len,
            )
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self._sequences: dict[str, Sequence] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._finished_ids: list[str] = []

    def _load_tokenizer(self, model: ResolvedModel) -> PreTrainedTokenizerBase | None:
        if self.config.skip_tokenizer_init:
            return None
        source = self.config.tokenizer or model.tokenizer_dir
        if source is None:
            logger.info("model %r ships no tokenizer: prompts must be token ids", model.name)
            return None
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)

    def _build_executor(self, model: ResolvedModel) -> Executor:
        config = self.config
        dtype = self.spec.dtype if config.dtype == "auto" else parse_dtype(config.dtype)
        weights: WeightSource
        if config.load_format == "dummy":
            weights = DummyWeights(self.spec, config.seed)
        elif model.weights_dir is None:
            raise ValueError(f"load_format: preset {model.name!r} has no weights; use load_format='dummy'")
        else:
            weights = CheckpointWeights(model.weights_dir, self.spec)
        worker = Worker(
            self.spec, weights, config, (0, self.spec.num_layers), self.max_model_len, dtype, config.resolve_device()
        )
        return InProcessExecutor(worker)

    # ---- requests -------------------------------------------------------------------------

    def tokenize(self, prompt: PromptInput) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer; pass token ids instead")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams) -> None:
        """Validate and queue a request; raises ValueError naming the offending field."""
        self.add_sequence(self.make_sequence(request_id, prompt, params))

    def make_sequence(self, request_id: str, prompt: PromptInput, params: SamplingParams) -> Sequence:
        """A validated, not yet queued request (so a batch can be checked whole first)."""
        if request_id in self._sequences:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        token_ids = self.tokenize(prompt)
        self._validate_prompt(token_ids)
        max_total = self.max_model_len if params.max_tokens is None else len(token_ids) + params.max_tokens
        seq = Sequence(
            request_id,
            token_ids,
            params,
            min(max_total, self.max_model_len),
            prompt if isinstance(prompt, str) else None,
        )
        kv_tokens = max(seq.num_prompt_tokens, seq.max_total_tokens - 1)  # the last token needs no KV
        if self.block_manager.blocks_for(kv_tokens) > self.block_manager.num_total_blocks:
            raise ValueError(
                f"max_tokens: the request may grow to {kv_tokens} tokens, more than the KV cache holds "
                f"({self.block_manager.num_total_blocks * self.config.block_size})"
            )
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        params = seq.sampling_params
        if self.tokenizer is not None and params.stop:
            self._detokenizers[seq.request_id] = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
        self._sequences[seq.request_id] = seq
        self.scheduler.add(seq)

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt: must not be empty")
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"prompt: {len(token_ids)} tokens is longer than max_model_len={self.max_model_len}")
        bad = [t for t in token_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {self.spec.vocab_size})")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self._sequences.get(request_id)
        if seq is None or seq.is_finished:
            return None
        self.scheduler.finish(seq, "abort")
        return self._finish_output(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; returns the requests that finished in it."""
        output = self.scheduler.schedule()
        if output.is_empty:
            return []
        now = time.monotonic()
        for seq, _ in output.scheduled:
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
        step = build_step_input(output.scheduled, self.config.block_size, self._finished_ids)
        self._finished_ids = []
        sampled = self.executor.execute(step)
        finished = []
        now = time.monotonic()
        for seq in self.scheduler.update(output, sampled.tolist()):
            if seq.metrics.first_token_time is None:
                seq.metrics.first_token_time = now
            reason = self._check_stop(seq)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                finished.append(self._finish_output(seq))
        return finished

    def _check_stop(self, seq: Sequence) -> str | None:
        params = seq.sampling_params
        token = seq.token_ids[-1]
        if not params.ignore_eos and token in self.spec.eos_token_ids:
            return "stop"
        if token in params.stop_token_ids:
            seq.stop_reason = token
            return "stop"
        detok = self._detokenizers.get(seq.request_id)
        if detok is not None:
            new_chars = len(detok.step(token))
            hit = detok.find_stop(new_chars, params.stop) if new_chars else None
            if hit is not None:
                index, stop = hit
                detok.text = detok.text[: index + len(stop) if params.include_stop_str_in_output else index]
                seq.stop_reason = stop
                return "stop"
        if len(seq) >= seq.max_total_tokens:
            return "length"
        return None

    def _finish_output(self, seq: Sequence) -> RequestOutput:
        seq.metrics.finished_time = time.monotonic()
        del self._sequences[seq.request_id]
        self._finished_ids.append(seq.request_id)
        detok = self._detokenizers.pop(seq.request_id, None)
        output_ids = seq.output_token_ids
        # As in vLLM, the text leaves out the token that stopped the request (eos or one of
        # stop_token_ids) unless include_stop_str_in_output, with or without stop strings.
        stopped_on_token = seq.finish_reason == "stop" and not isinstance(seq.stop_reason, str)
        keep_stop = seq.sampling_params.include_stop_str_in_output
        if detok is not None:
            if stopped_on_token and keep_stop:
                detok.step(output_ids[-1])  # _check_stop did not feed it
            text = detok.text
        elif self.tokenizer is not None:
            text_ids = output_ids[:-1] if stopped_on_token and not keep_stop else output_ids
            text = self.tokenizer.decode(text_ids, skip_special_tokens=seq.sampling_params.skip_special_tokens)
        else:
            text = ""
        completion = CompletionOutput(0, text, output_ids, seq.finish_reason, seq.stop_reason)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion], True, seq.metrics)

    # ---- memory: parameters <-> KV ---------------------------------------------------------

    def release_layer(self, layer: int) -> int:
        """Drop local layer `layer`'s weights; its bytes join the KV pool at once. Returns the
        number of blocks added."""
        blocks = self.executor.release_layer(layer)
        self.block_manager.add_blocks(blocks)
        return len(blocks)

    def reclaim_layer(self, layer: int) -> None:
        """Take local layer `layer`'s bytes back and refill its weights; refused (RuntimeError)
        while any of its blocks holds KV."""
        self.block_manager.remove_blocks(self.executor.layout.released_blocks(layer))
        self.executor.reclaim_layer(layer)
