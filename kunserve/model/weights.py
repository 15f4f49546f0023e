"""Where weights come from: a local safetensors checkpoint, or seeded random (dummy) values.

A source fills one decoder layer's arena views at a time, so the same call that loads the
model at start-up also refills a layer reclaimed after a drop.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from kunserve.arch.spec import ModelSpec
from kunserve.model.decoder import LayerWeights, StageWeights

# Dummy weights: small normal values keep activations finite through many layers.
DUMMY_WEIGHT_STD = 0.02


class WeightSource(ABC):
    @abstractmethod
    def load_layer(self, layer: int, dst: LayerWeights) -> None:
        """Fill `dst` (arena views) with layer `layer`'s weights."""

    @abstractmethod
    def load_stage(self, first: bool, last: bool, dtype: torch.dtype, device: torch.device) -> StageWeights:
        """The weights outside the arena that a stage with these ends needs."""


class CheckpointWeights(WeightSource):
    """A Hugging Face model directory: `*.safetensors`, sharded with an index or not."""

    def __init__(self, model_dir: str | Path, spec: ModelSpec) -> None:
        self.dir = Path(model_dir)
        self.spec = spec
        self.files = self._index()

    def _index(self) -> dict[str, Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.dir / file for name, file in weight_map.items()}
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise ValueError(f"model: no *.safetensors files in {str(self.dir)!r}")
        names: dict[str, Path] = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                names.update(dict.fromkeys(f.keys(), file))
        return names

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.files]
        if missing:
            raise ValueError(f"model: checkpoint {str(self.dir)!r} lacks tensors {missing}")
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as f:
                out.update({n: f.get_tensor(n) for n in file_names})
        return out

    def load_layer(self, layer: int, dst: LayerWeights) -> None:
        targets = dst.tensors()
        wanted = {t.name: t.checkpoint_keys(layer) for t in self.spec.layer_tensors()}
        tensors = self._read([n for group in wanted.values() for n in group])
        for name, group in wanted.items():
            # Fused parameters (qkv, gate_up) are the checkpoint tensors stacked along dim 0.
            targets[name].copy_(torch.cat([tensors[n] for n in group], dim=0))

    def load_stage(self, first: bool, last: bool, dtype: torch.dtype, device: torch.device) -> StageWeights:
        names = []
        if first:
            names.append("model.embed_tokens.weight")
        if last:
            names.append("model.norm.weight")
            names.append("model.embed_tokens.weight" if self.spec.tie_word_embeddings else "lm_head.weight")
        t = {n: v.to(device=device, dtype=dtype) for n, v in self._read(sorted(set(names))).items()}
        head = "model.embed_tokens.weight" if self.spec.tie_word_embeddings else "lm_head.weight"
        return StageWeights(
            embed=t.get("model.embed_tokens.weight") if first else None,
            final_norm=t.get("model.norm.weight"),
            lm_head=t.get(head) if last else None,
        )


class DummyWeights(WeightSource):
    """Seeded random weights of a real config, for speed runs. Refilling a layer reproduces
    exactly the values it had, because each layer draws from its own seeded generator."""

    def __init__(self, spec: ModelSpec, seed: int) -> None:
        self.spec = spec
        self.seed = seed

    def _generator(self, stream: int, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + stream)

    def load_layer(self, layer: int, dst: LayerWeights) -> None:
        g = self._generator(layer, dst.qkv.device)
        targets = dst.tensors()
        for tensor in self.spec.layer_tensors():  # draws in schema order, the same on every refill
            if tensor.is_norm:
                targets[tensor.name].fill_(1.0)
            else:
                targets[tensor.name].normal_(0.0, DUMMY_WEIGHT_STD, generator=g)

    def load_stage(self, first: bool, last: bool, dtype: torch.dtype, device: torch.device) -> StageWeights:
        g = self._generator(self.spec.num_layers, device)
        shape = (self.spec.vocab_size, self.spec.hidden_size)
        embed = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, DUMMY_WEIGHT_STD, generator=g)
        head = embed
        if last and not self.spec.tie_word_embeddings:
            head = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, DUMMY_WEIGHT_STD, generator=g)
        return StageWeights(
            embed=embed if first else None,
            final_norm=torch.ones(self.spec.hidden_size, dtype=dtype, device=device) if last else None,
            lm_head=head if last else None,
        )
