"""The `kunserve` command: build a tiny model, then generate from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kunserve.arch.spec import ModelSpec
from kunserve.cli import main


def test_make_tiny_model_writes_a_loadable_directory(tmp_path: Path) -> None:
    main(["make-tiny-model", str(tmp_path / "m"), "--arch", "qwen2"])
    spec = ModelSpec.from_dir(tmp_path / "m")
    assert spec.family == "qwen2" and (tmp_path / "m" / "tokenizer.json").is_file()


def test_generate_prints_completions_and_throughput(
    llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["generate", "--model", str(llama_dir), "--prompt", "Hi", "--max-tokens", "4", "--max-model-len", "64"])
    out = capsys.readouterr().out
    assert "'Hi' ->" in out and "1 requests, 4 tokens" in out
