"""Where weights come from: a local safetensors checkpoint, or seeded random (dummy) values.

A source fills one decoder layer's arena views at a time, so the same call that loads the
model at start-up also refills a layer reclaimed after a drop. Under tensor parallelism a
source serves one rank: it reads (or draws) only that rank's shard of each tensor.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from kunserve.arch.schema import COLUMN, ROW, LayerTensor
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
    """A Hugging Face model directory: `*.safetensors`, sharded with an index or not. As rank
    `rank` of `tp_size`, it reads only that rank's slices of each tensor."""

    def __init__(self, model_dir: str | Path, spec: ModelSpec, rank: int = 0, tp_size: int = 1) -> None:
        self.dir = Path(model_dir)
        self.spec = spec
        self.rank, self.tp_size = rank, tp_size
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

    def _read(self, names: dict[str, tuple[slice, ...]]) -> dict[str, torch.Tensor]:
        """The checkpoint tensors `names`, each cut to its index (() for all of it): a slice
        is read from the file without the rest of the tensor."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise ValueError(f"model: checkpoint {str(self.dir)!r} lacks tensors {missing}")
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as f:
                out.update({n: f.get_slice(n)[names[n]] if names[n] else f.get_tensor(n) for n in file_names})
        return out

    def _shard_index(self, tensor: LayerTensor) -> list[tuple[slice, ...]]:
        """This rank's index into each checkpoint tensor of `tensor`: a COLUMN tensor's parts
        by rows, a ROW tensor's by columns, a replicated one whole."""
        if self.tp_size == 1 or tensor.split not in (COLUMN, ROW):
            return [()] * len(tensor.checkpoint_names)
        rows = tensor.part_rows(self.rank, self.tp_size)
        return [(r,) if tensor.split == COLUMN else (slice(None), r) for r in rows]

    def load_layer(self, layer: int, dst: LayerWeights) -> None:
        targets = dst.tensors()
        wanted = {t.name: dict(zip(t.checkpoint_keys(layer), self._shard_index(t))) for t in self.spec.layer_tensors()}
        read = self._read({n: index for group in wanted.values() for n, index in group.items()})
        for name, group in wanted.items():
            # Fused parameters (qkv, gate_up) are the checkpoint tensors (a rank: its slices
            # of them) stacked along dim 0.
            targets[name].copy_(torch.cat([read[n] for n in group], dim=0))

    def load_stage(self, first: bool, last: bool, dtype: torch.dtype, device: torch.device) -> StageWeights:
        embed = "model.embed_tokens.weight"
        head = embed if self.spec.tie_word_embeddings else "lm_head.weight"
        rows = self.spec.vocab_per_rank(self.tp_size)
        # This rank's vocab rows (all of them for one rank); the last rank's may run short.
        vocab = (slice(self.rank * rows, min(self.spec.vocab_size, (self.rank + 1) * rows)),)
        norm = "model.norm.weight"
        names = {**({embed: vocab} if first else {}), **({norm: (), head: vocab} if last else {})}
        t = {n: v.to(device=device, dtype=dtype) if n == norm else pad_rows(v.to(device=device, dtype=dtype), rows)
             for n, v in self._read(names).items()}
        return StageWeights(embed=t.get(embed) if first else None, final_norm=t.get(norm),
                            lm_head=t.get(head) if last else None)


class DummyWeights(WeightSource):
    """Seeded random weights of a real config, for speed runs. Refilling a layer reproduces
    exactly the values it had, because each layer draws from its own seeded generator. Every
    tensor is drawn whole and a rank keeps its shard, so the model is the same at any
    tensor-parallel size."""

    def __init__(self, spec: ModelSpec, seed: int, rank: int = 0, tp_size: int = 1) -> None:
        self.spec = spec
        self.seed = seed
        self.rank, self.tp_size = rank, tp_size

    def _generator(self, stream: int, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + stream)

    def load_layer(self, layer: int, dst: LayerWeights) -> None:
        g = self._generator(layer, dst.qkv.device)
        targets = dst.tensors()
        for tensor in self.spec.layer_tensors():  # draws in schema order, the same on every refill
            target = targets[tensor.name]
            if tensor.is_norm:
                target.fill_(1.0)
            elif target.shape == tensor.shape:  # the whole tensor: drawn in place
                target.normal_(0.0, DUMMY_WEIGHT_STD, generator=g)
            else:
                whole = torch.empty(tensor.shape, dtype=target.dtype, device=target.device)
                whole.normal_(0.0, DUMMY_WEIGHT_STD, generator=g)
                parts = [whole.narrow(tensor.dim, s.start, s.stop - s.start)
                         for s in tensor.shard_index(self.rank, self.tp_size)]
                target.copy_(torch.cat(parts, dim=tensor.dim))

    def load_stage(self, first: bool, last: bool, dtype: torch.dtype, device: torch.device) -> StageWeights:
        g = self._generator(self.spec.num_layers, device)
        shape = (self.spec.vocab_size, self.spec.hidden_size)
        embed = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, DUMMY_WEIGHT_STD, generator=g)
        head = embed
        if last and not self.spec.tie_word_embeddings:
            head = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, DUMMY_WEIGHT_STD, generator=g)
        tied = head is embed
        embed = self._vocab_rows(embed)
        head = embed if tied else self._vocab_rows(head)
        return StageWeights(
            embed=embed if first else None,
            final_norm=torch.ones(self.spec.hidden_size, dtype=dtype, device=device) if last else None,
            lm_head=head if last else None,
        )

    def _vocab_rows(self, table: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a vocab-sized table, in a tensor of their own (the whole
        table is freed), padded at the end; the table itself for one rank."""
        if self.tp_size == 1:
            return table
        rows = self.spec.vocab_per_rank(self.tp_size)
        return pad_rows(table[self.rank * rows : (self.rank + 1) * rows].clone(), rows)


def pad_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """`table` with zero rows appended up to `rows` (a vocab slice past the vocab's end); as
    it is when it has them all."""
    if table.shape[0] == rows:
        return table
    padded = table.new_zeros((rows, *table.shape[1:]))
    padded[: table.shape[0]] = table
    return padded
