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
        """Returns the sampled token ids, one per row of `step.sample_rows`."""
        self.sampler.forget(step.finished_request_ids)
        if step.num_tokens == 0:
            return np.empty(0, dtype=np.int64)
        if self.graphs is not None and self.graphs.can_run(step):
            hidden = self.graphs.run(step)
        else:
            hidden = self._forward_eager(step)
        if len(step.sample_rows) == 0:
            return np.empty(0, dtype=np.int64)
        last_token = np.cumsum(step.batch.query_lens)[step.sample_rows] - 1
        logits = self.model.compute_logits(hidden[torch.from_numpy(last_token).to(self.device)])
        return self.sampler(logits, step.sampling).cpu().numpy()

    def _forward_eager(self, step: StepInput) -> torch.Tensor:
        tokens = torch.from_numpy(step.token_ids).to(self.device, non_blocking=True)
        positions = torch.from_numpy(step.positions).to(self.device, non_blocking=True)
        meta = self.model.backend.build_metadata(step.batch, self.device)
        return self.model.forward(tokens, positions, meta)
