"""Batched sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds.

One pass over the batch: rows differ only in the tensors of settings. Sampling draws by the
exponential race (argmax of p / E with E ~ Exp(1)), which equals drawing from p and lets
every row use its own random stream without a per-row multinomial call.
"""

from __future__ import annotations

import torch

from kunserve.kernels.staging import to_device
from kunserve.step import SamplingBatch


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._generators.pop(rid, None)

    def take_states(self, request_ids: list[str]) -> dict[str, torch.Tensor]:
        """The random-stream states of these requests' generators, which this sampler forgets
        (their requests move to another device's sampler: `give_states` there)."""
        return {rid: self._generators.pop(rid).get_state() for rid in request_ids if rid in self._generators}

    def give_states(self, states: dict[str, torch.Tensor]) -> None:
        for rid, state in states.items():
            generator = torch.Generator(device=self.device)
            generator.set_state(state)
            self._generators[rid] = generator

    def __call__(self, logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
        """logits: [S, V] float32 -> token ids [S] int64."""
        greedy_tokens = logits.argmax(dim=-1)
        if not (params.temperature > 0).any():
            return greedy_tokens
        temperature = to_device(params.temperature, self.device)
        sampled = self._sample(logits, params, temperature)
        return torch.where(temperature > 0, sampled, greedy_tokens)

    def _sample(self, logits: torch.Tensor, params: SamplingBatch, temperature: torch.Tensor) -> torch.Tensor:
        # Greedy rows divide by 1 and are discarded by the caller.
        logits = logits / torch.where(temperature > 0, temperature, 1.0).unsqueeze(1)
        if (params.top_k > 0).any() or (params.top_p < 1).any():
            logits = self._top_k_top_p(logits, params)
        probs = logits.softmax(dim=-1)
        if (params.min_p > 0).any():
            min_p = to_device(params.min_p, self.device).unsqueeze(1)
            probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        noise = torch.empty_like(probs).exponential_()
        for row, rid, seed in params.seeded:
            gen = self._generators.get(rid)
            if gen is None:
                gen = self._generators[rid] = torch.Generator(device=self.device).manual_seed(seed)
            noise[row].exponential_(generator=gen)
        return (probs / noise).argmax(dim=-1)

    def _top_k_top_p(self, logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
        vocab = logits.shape[-1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=self.device).unsqueeze(0)
        top_k = to_device(params.top_k, self.device)
        cut = rank >= torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
        # before it already does. The first token always stays.
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        top_p = to_device(params.top_p, self.device).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
