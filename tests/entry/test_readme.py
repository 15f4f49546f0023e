"""README.md's commands are what a newcomer types first. Every `kunserve` command in its bash
blocks parses with the command's own parser, every file a command names ships in the
repository (nothing points outside it), the Python examples run, and the simulate example
runs in a short form; `benchmarks/readme_commands.py` runs every command as written."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest

from kunserve.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
# The README's simulate example, shortened for a test: a window that still overloads the replicas
# and runs on past kunserve's first drop (at 30 s), so that its requests are served otherwise.
QUICK_TRACE_DURATION_S = "35"


def load_runner() -> ModuleType:
    """benchmarks/readme_commands.py (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("readme_commands", REPO / "benchmarks" / "readme_commands.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


RUNNER = load_runner()
COMMANDS = RUNNER.readme_commands()


def kunserve_argvs() -> list[list[str]]:
    """The arguments of every `kunserve` command in the README's bash blocks."""
    argvs = []
    for command in COMMANDS:
        if command.kind != "bash":
            continue
        for part in RUNNER.code_of(command).split(" && "):
            tokens = shlex.split(part)
            if tokens and tokens[0] == "kunserve":
                argvs.append(tokens[1:])
    return argvs


def simulate_example() -> list[str]:
    return next(argv for argv in kunserve_argvs() if argv[0] == "simulate")


def test_the_readme_has_commands_of_every_kind() -> None:
    subcommands = {argv[0] for argv in kunserve_argvs()}
    assert {"bench", "serve", "simulate", "generate", "make-tiny-model"} <= subcommands


@pytest.mark.parametrize("argv", kunserve_argvs(), ids=lambda argv: " ".join(argv)[:60])
def test_every_readme_kunserve_command_parses(argv: list[str]) -> None:
    build_parser().parse_args(argv)


def test_every_repository_path_a_readme_command_names_exists() -> None:
    named = [token for command in COMMANDS if command.kind == "bash"
             for token in shlex.split(RUNNER.code_of(command))
             if token.startswith(("data/", "benchmarks/", "docs/", "kunserve/"))]
    assert named and [path for path in named if not (REPO / path).exists()] == []


@pytest.mark.parametrize("name", ["README.md", "docs/design.md", "docs/benchmarks.md", "docs/paper.md"])
def test_no_document_points_outside_the_repository(name: str) -> None:
    assert "../" not in (REPO / name).read_text()  # a clone has nothing above its root


def test_on_a_gpu_machine_the_runner_skips_only_installs_the_suite_placeholders_and_ray() -> None:
    reasons = {RUNNER.skip_reason(command, False, False, True) for command in COMMANDS}
    assert reasons - {None} <= {RUNNER.SKIP_INSTALL, RUNNER.SKIP_TESTS, RUNNER.SKIP_PLACEHOLDER, RUNNER.SKIP_RAY}


def test_without_a_gpu_the_runner_still_runs_the_demo_the_server_and_the_simulator() -> None:
    runs = [command.text for command in COMMANDS if RUNNER.skip_reason(command, False, False, False) is None]
    for start in ("kunserve serve", "kunserve bench --demo", "kunserve simulate", "curl"):
        assert any(start in text for text in runs), start


def test_the_offline_python_examples_run(capsys: pytest.CaptureFixture[str]) -> None:
    examples = [c.text for c in COMMANDS if c.kind == "python" and "from kunserve import LLM" in c.text]
    assert len(examples) == 2
    for example in examples:
        exec(compile(example, "README.md", "exec"), {})  # noqa: S102 -- the README's own example, run as a reader would
    assert capsys.readouterr().out


@pytest.mark.slow  # a minute of simulation
def test_the_simulate_example_runs_in_a_short_form_and_the_policies_differ(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = simulate_example()
    argv[argv.index("--trace-duration-s") + 1] = QUICK_TRACE_DURATION_S
    argv[argv.index("--out-dir") + 1] = str(tmp_path / "sim")
    main([*argv, "--no-progress"])
    printed = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[5].strip() for line in printed.splitlines()
            if line.startswith("| ") and "policy" not in line}
    assert set(rows) == {"recompute", "swap", "migrate", "kunserve"}
    assert rows["kunserve"] != rows["recompute"]  # P99 TTFT
    assert "kunserve: drop of replicas" in printed
    summaries = {run["policy"]: run["summary"] for run in json.loads((tmp_path / "sim" / "results.json").read_text())["runs"]}
    assert summaries["swap"]["swap_outs"] > 0 and summaries["recompute"]["swap_outs"] == 0
