"""Command-line flags for EngineConfig, shared by the commands that build engines
(`kunserve generate`, `serve`, `bench --launch`)."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from kunserve.config import EngineConfig

# Short spellings of engine flags, as vLLM has them.
SHORT_FLAGS = {"tensor_parallel_size": "-tp"}


def add_engine_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("model",)) -> None:
    """One flag per EngineConfig field (`max_num_seqs` -> `--max-num-seqs`, a few also short:
    SHORT_FLAGS); see kunserve/config.py."""
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-"), *([SHORT_FLAGS[f.name]] if f.name in SHORT_FLAGS else [])]
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        kind = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
        parser.add_argument(*flags, type=kind, default=f.default, help=f"(default: {f.default})")


def engine_config(args: argparse.Namespace, **overrides: object) -> EngineConfig:
    """The EngineConfig of the parsed flags (fields without a flag keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    return EngineConfig(**{**values, **overrides})
