"""The package's structure, as docs/design.md states it.

Specified: every import inside the package runs downward through the layers
    entry points (cli, llm, server, bench, sim) -> cluster -> engine -> executor -> worker
    -> model -> kernels -> the foundation (config, step, layout, arch, sampling_params, outputs, logs)
(imports within one layer are allowed), and no files import each other in a cycle. Imports
inside functions count: they tie the files together as much as those at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kunserve"

# Lowest first; a module's layer is the first entry that names its package or file.
LAYERS: list[tuple[str, ...]] = [
    ("arch", "config", "step", "layout", "sampling_params", "outputs", "logs", "exit_codes"),
    ("kernels",),
    ("model",),
    ("worker",),
    ("executor",),
    ("engine",),
    ("cluster",),
    ("server", "bench", "sim", "llm", "cli", "__main__", "engine_args", "cluster_args", "__init__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports (a package's name stands for its __init__)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found.update(name for name in names if name in modules)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {module: imports_of(path, set(files)) - {module} for module, path in files.items()}


def test_every_module_has_a_layer(graph: dict[str, set[str]]) -> None:
    for module in graph:
        layer_of(module)


def test_no_module_imports_from_a_higher_layer(graph: dict[str, set[str]]) -> None:
    upward = sorted(f"{module} -> {imported}" for module, imported_set in graph.items()
                    for imported in imported_set if layer_of(imported) > layer_of(module))
    assert upward == []


def test_no_files_import_each_other_in_a_cycle(graph: dict[str, set[str]]) -> None:
    cycles = []
    state: dict[str, str] = {}  # "open" while on the search path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycles.append(path[path.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, path + [imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
