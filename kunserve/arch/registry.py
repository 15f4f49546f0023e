"""The architectures kunserve serves. Adding one: its module in kunserve/arch/, and a line here."""

from __future__ import annotations

from kunserve.arch.family import Family
from kunserve.arch.llama import LLAMA
from kunserve.arch.mistral import MISTRAL
from kunserve.arch.qwen2 import QWEN2

FAMILIES: tuple[Family, ...] = (LLAMA, QWEN2, MISTRAL)

_BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}
# HF architecture name (config.json `architectures`) -> the family serving it.
HF_ARCHITECTURES: dict[str, Family] = {hf: f for f in FAMILIES for hf in f.hf_architectures}
# Families kunserve can build tiny random models of (the `tiny-<name>` presets).
TINY_ARCHS: tuple[str, ...] = tuple(f.name for f in FAMILIES if f.tiny is not None)


def family(name: str) -> Family:
    """The family named `name` (ModelSpec.family)."""
    if name not in _BY_NAME:
        raise ValueError(f"family: unknown architecture family {name!r}; expected one of {sorted(_BY_NAME)}")
    return _BY_NAME[name]


def family_of(architectures: list[str]) -> Family:
    """The family serving the first of a config's `architectures` that kunserve supports."""
    found = next((HF_ARCHITECTURES[a] for a in architectures if a in HF_ARCHITECTURES), None)
    if found is None:
        raise ValueError(
            f"architectures: unsupported architecture {architectures!r}; kunserve supports {sorted(HF_ARCHITECTURES)}"
        )
    return found
