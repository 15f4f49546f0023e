"""One step on one device: upload the step's inputs, run the stage, sample on the last stage."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kunserve.kernels.staging import to_device
from kunserve.model.decoder import DecoderStage
from kunserve.model.parallel import TensorParallel
from kunserve.step import StepInput
from kunserve.worker.cuda_graphs import DecodeGraphs, fill_ahead_tokens
from kunserve.worker.prompt_graphs import PromptGraphs
from kunserve.worker.sampler import Sampler


@dataclass
class PendingTokens:
    """Sampled token ids on their way to the host; `result` waits for them."""

    host: torch.Tensor
    ready: torch.cuda.Event | None = None  # None: already on the host

    def result(self) -> np.ndarray:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.numpy()


class ModelRunner:
    def __init__(self, model: DecoderStage, device: torch.device, graphs: DecodeGraphs | None = None,
                 prompt_graphs: PromptGraphs | None = None) -> None:
        self.model = model
        self.device = device
        self.graphs = graphs
        self.prompt_graphs = prompt_graphs
        self.sampler = Sampler(device)
        # The last launched step's sampled tokens, on the device: the inputs of decodes that
        # the next step runs ahead of them.
        self.last_sampled: torch.Tensor | None = None

    def execute(self, step: StepInput) -> np.ndarray:
        """A whole model's step: returns the sampled token ids, one per row of `step.sample_rows`."""
        return self.launch(step).result()

    @torch.inference_mode()
    def launch(self, step: StepInput) -> PendingTokens:
        """Start a whole model's step on the device; its sampled tokens come back as they are
        ready, so the host may stage the next step meanwhile."""
        if step.num_tokens == 0:
            self.sampler.forget(step.finished_request_ids)
            return PendingTokens(torch.empty(0, dtype=torch.int64))
        sampled = self.sample_on_device(step, self.forward(step))
        self.last_sampled = sampled
        if sampled.device.type != "cuda":
            return PendingTokens(sampled)
        host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
        host.copy_(sampled, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return PendingTokens(host, ready)

    @torch.inference_mode()
    def forward(self, step: StepInput, hidden_in: torch.Tensor | None = None) -> torch.Tensor:
        """This stage's hidden states [T, hidden]; `hidden_in` is the previous stage's output
        (None on the first stage, which embeds the step's token ids)."""
        if self.graphs is not None and self.graphs.can_run(step):
            return self.graphs.run(step, hidden_in, self.last_sampled)
        if self.prompt_graphs is not None and self.prompt_graphs.can_run(step):
            return self.prompt_graphs.run(step, hidden_in, self.last_sampled)
        if hidden_in is None:
            inputs = to_device(step.token_ids, self.device)
            fill_ahead_tokens(inputs, step, self.last_sampled)
        else:
            inputs = hidden_in
        positions = to_device(step.positions, self.device)
        meta = self.model.backend.build_metadata(step.batch, self.device)
        return self.model.forward(inputs, positions, meta)

    @torch.inference_mode()
    def sample(self, step: StepInput, hidden: torch.Tensor) -> np.ndarray | None:
        """The last stage's sampling from its hidden states (kept on the device too, for a
        step scheduled ahead of this one); None on a tensor-parallel rank that does not sample."""
        self.last_sampled = self.sample_on_device(step, hidden)
        return self.last_sampled.cpu().numpy() if self.model.tp.samples else None

    def sample_on_device(self, step: StepInput, hidden: torch.Tensor) -> torch.Tensor:
        """The sampled tokens; on a tensor-parallel rank other than 0, which only helps compute
        the logits, a buffer of their shape (share_last_sampled fills it when a step needs them)."""
        self.sampler.forget(step.finished_request_ids)
        if len(step.sample_rows) == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        last_token = np.cumsum(step.batch.query_lens)[step.sample_rows] - 1
        logits = self.model.compute_logits(hidden[to_device(last_token, self.device)])
        if not self.model.tp.samples:
            return torch.empty(len(step.sample_rows), dtype=torch.int64, device=self.device)
        return self.sampler(logits, step.sampling)

    def share_last_sampled(self, tp: TensorParallel) -> None:
        """Rank 0's last sampled tokens on every rank of the stage, for a step whose decodes
        were scheduled ahead of them (each rank embeds those tokens itself)."""
        if self.last_sampled is None:
            raise RuntimeError("the step decodes ahead of a step this stage did not sample")
        tp.broadcast_from_sampler(self.last_sampled)
