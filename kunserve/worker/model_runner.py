"""One step on one device: upload the step's inputs, run the stage, sample on the last stage."""

from __future__ import annotations

import numpy as np
import torch

from kunserve.model.decoder import DecoderStage
from kunserve.step import StepInput
from kunserve.worker.cuda_graphs import DecodeGraphs
from kunserve.worker.sampler import Sampler


class ModelRunner:
    def __init__(self, model: DecoderStage, device: torch.device, graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.device = device
        self.graphs = graphs
        self.sampler = Sampler(device)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> np.ndarray:
        """A whole model's step: returns the sampled token ids, one per row of `step.sample_rows`."""
        if step.num_tokens == 0:
            self.sampler.forget(step.finished_request_ids)
            return np.empty(0, dtype=np.int64)
        return self.sample(step, self.forward(step))

    @torch.inference_mode()
    def forward(self, step: StepInput, hidden_in: torch.Tensor | None = None) -> torch.Tensor:
        """This stage's hidden states [T, hidden]; `hidden_in` is the previous stage's output
        (None on the first stage, which embeds the step's token ids)."""
        if self.graphs is not None and self.graphs.can_run(step):
            return self.graphs.run(step, hidden_in)
        inputs = torch.from_numpy(step.token_ids).to(self.device, non_blocking=True) if hidden_in is None else hidden_in
        positions = torch.from_numpy(step.positions).to(self.device, non_blocking=True)
        meta = self.model.backend.build_metadata(step.batch, self.device)
        return self.model.forward(inputs, positions, meta)

    @torch.inference_mode()
    def sample(self, step: StepInput, hidden: torch.Tensor) -> np.ndarray:
        """The last stage's sampling from its hidden states."""
        self.sampler.forget(step.finished_request_ids)
        if len(step.sample_rows) == 0:
            return np.empty(0, dtype=np.int64)
        last_token = np.cumsum(step.batch.query_lens)[step.sample_rows] - 1
        logits = self.model.compute_logits(hidden[torch.from_numpy(last_token).to(self.device)])
        return self.sampler(logits, step.sampling).cpu().numpy()
