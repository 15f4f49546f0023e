"""Incremental detokenization and stop-string matching for one sequence."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.text = ""

    def step(self, token_id: int) -> str:
        """Feed one token; returns the text it completes (empty while a character is partial)."""
        chunk = self._stream.step(self._backend, token_id) or ""
        self.text += chunk
        return chunk

    def find_stop(self, new_chars: int, stops: list[str]) -> tuple[int, str] | None:
        """The earliest stop string that the last `new_chars` characters complete, as
        (its index in the text, the string)."""
        hits = []
        for stop in stops:
            start = max(0, len(self.text) - new_chars - len(stop) + 1)
            index = self.text.find(stop, start)
            if index >= 0:
                hits.append((index, stop))
        return min(hits) if hits else None
