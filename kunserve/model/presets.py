"""Model names a user may give instead of a directory.

* `tiny-llama`, `tiny-qwen2`, `tiny-mistral` (one per family in TINY_ARCHS,
  kunserve/arch/registry.py): the embedded default models, generated locally on first use
  (kunserve/model/tiny.py). Nothing is downloaded.
* Real architectures as bare configs (`llama-3-8b`, `qwen2.5-32b`, ...): for speed runs with
  `load_format="dummy"`; they carry no weights and no tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kunserve.arch.registry import TINY_ARCHS
from kunserve.arch.spec import ModelSpec

DEFAULT_MODEL = "tiny-llama"
_CONFIG_DIR = Path(__file__).parent / "configs"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    spec: ModelSpec
    weights_dir: Path | None  # None: a bare config, dummy weights only
    tokenizer_dir: Path | None


def config_presets() -> list[str]:
    return sorted(p.stem for p in _CONFIG_DIR.glob("*.json"))


def resolve_model(name: str | None) -> ResolvedModel:
    name = name or DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.is_dir():
        has_tokenizer = any((path / f).is_file() for f in _TOKENIZER_FILES)
        return ResolvedModel(name, ModelSpec.from_dir(path), path, path if has_tokenizer else None)
    if name.startswith("tiny-") and name[len("tiny-") :] in TINY_ARCHS:
        from kunserve.model.tiny import default_model_dir  # transformers: imported only to build one

        model_dir = default_model_dir(name[len("tiny-") :])
        return ResolvedModel(name, ModelSpec.from_dir(model_dir), model_dir, model_dir)
    config = _CONFIG_DIR / f"{name}.json"
    if config.is_file():
        return ResolvedModel(name, ModelSpec.from_dict(json.loads(config.read_text())), None, None)
    raise ValueError(unknown_model_message(name, path))


def unknown_model_message(name: str, path: Path) -> str:
    """Why `name` names no model, and what would: a path that is not there, a Hugging Face hub
    id (kunserve reads local directories only; nothing is downloaded), or a mistyped preset."""
    known = [f"tiny-{a}" for a in TINY_ARCHS] + config_presets()
    if path.exists():
        return f"model: {name!r} is not a directory; give the model's directory (with config.json)"
    if path.is_absolute() or name.startswith((".", "~")):
        return f"model: no such directory {str(path)!r}"
    if name.count("/") == 1:
        return (f"model: {name!r} is not a local directory. kunserve loads models from local directories only "
                f"(nothing is downloaded): fetch it first, e.g. `hf download {name} --local-dir DIR`, "
                f"then give DIR; or a preset: {', '.join(known)}")
    return f"model: {name!r} is neither a model directory nor a preset; presets: {', '.join(known)}"
