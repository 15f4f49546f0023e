"""From sampled tokens to what callers see: stop decisions, incremental text, and the
RequestOutputs each request's output kind asks for (every step, only new text, or once)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from kunserve.engine.detokenizer import IncrementalDetokenizer
from kunserve.engine.sequence import Sequence
from kunserve.outputs import CompletionOutput, RequestOutput
from kunserve.sampling_params import RequestOutputKind


@dataclass
class _RequestText:
    detokenizer: IncrementalDetokenizer | None
    # Characters kept back from a running request's text: a stop string may still
    # complete over them, and text once sent cannot be taken back.
    holdback: int
    sent_tokens: int = 0
    sent_chars: int = 0


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, eos_token_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self._texts: dict[str, _RequestText] = {}

    def add(self, seq: Sequence) -> None:
        params = seq.sampling_params
        wants_text_while_running = params.output_kind is not RequestOutputKind.FINAL_ONLY
        detok = None
        if self.tokenizer is not None and (params.stop or wants_text_while_running):
            detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
        holdback = max((len(s) for s in params.stop), default=1) - 1
        self._texts[seq.request_id] = _RequestText(detok, holdback)

    def adopt(self, source: OutputProcessor, request_id: str) -> None:
        """Take a request's text state over from another engine's processor."""
        self._texts[request_id] = source._texts.pop(request_id)

    def forget(self, request_id: str) -> None:
        """Drop a request's text state (a request that failed)."""
        self._texts.pop(request_id, None)

    def stops_on_length_only(self, seq: Sequence) -> bool:
        """Whether only its length can end `seq`, and nothing is output before it ends (so
        several of its tokens may be added at once: kunserve/sim/fast_forward.py)."""
        params = seq.sampling_params
        return (params.ignore_eos and not params.stop_token_ids and self._texts[seq.request_id].detokenizer is None
                and params.output_kind is RequestOutputKind.FINAL_ONLY)

    def check_stop(self, seq: Sequence) -> str | None:
        """The finish reason that the token just appended to `seq` triggers, if any."""
        params = seq.sampling_params
        token = seq.token_ids[-1]
        if not params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in params.stop_token_ids:
            seq.stop_reason = token
            return "stop"
        detok = self._texts[seq.request_id].detokenizer
        if detok is not None:
            new_chars = len(detok.step(token))
            hit = detok.find_stop(new_chars, params.stop) if new_chars and params.stop else None
            if hit is not None:
                index, stop = hit
                detok.text = detok.text[: index + len(stop) if params.include_stop_str_in_output else index]
                seq.stop_reason = stop
                return "stop"
        if len(seq) >= seq.max_total_tokens:
            return "length"
        return None

    def running_output(self, seq: Sequence) -> RequestOutput | None:
        """The output of a request that got a token and goes on; None for FINAL_ONLY."""
        kind = seq.sampling_params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY:
            return None
        state = self._texts[seq.request_id]
        text = ""
        if state.detokenizer is not None:
            full = state.detokenizer.text
            text = full[: max(state.sent_chars, len(full) - state.holdback)]
        return self._emit(seq, state, text, kind, finished=False)

    def finished_output(self, seq: Sequence) -> RequestOutput:
        """The last output of a finished request; forgets the request."""
        state = self._texts.pop(seq.request_id)
        params = seq.sampling_params
        if isinstance(seq.stop_reason, str):
            assert state.detokenizer is not None
            text = state.detokenizer.text  # check_stop cut it at the stop string
        elif self.tokenizer is not None:
            # A whole decode, not the detokenizer's text: that one holds back the bytes of
            # an unfinished character, which the end must show (as replacement characters).
            # As in vLLM, the token that stopped the request (eos or one of stop_token_ids)
            # is left out unless include_stop_str_in_output.
            output_ids = seq.output_token_ids
            drop_last = seq.finish_reason == "stop" and not params.include_stop_str_in_output
            text = self.tokenizer.decode(output_ids[:-1] if drop_last else output_ids,
                                         skip_special_tokens=params.skip_special_tokens)
        else:
            text = ""
        return self._emit(seq, state, text, seq.sampling_params.output_kind, finished=True)

    def _emit(
        self, seq: Sequence, state: _RequestText, text: str, kind: RequestOutputKind, finished: bool
    ) -> RequestOutput:
        token_ids = seq.output_token_ids
        if kind is RequestOutputKind.DELTA:
            token_ids, text = token_ids[state.sent_tokens :], text[state.sent_chars :]
            state.sent_chars += len(text)
        else:
            state.sent_chars = len(text)
        state.sent_tokens = seq.num_output_tokens
        completion = CompletionOutput(0, text, token_ids, seq.finish_reason, seq.stop_reason)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion], finished, seq.metrics)
