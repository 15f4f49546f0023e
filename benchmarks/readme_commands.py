"""Run README.md's commands as written, one after another, and say how each went.

Every command of the README's ```bash blocks (continuation lines joined) and every ```python
block runs in a scratch directory that links the repository's `data/`, `benchmarks/` and
`docs/` (so relative paths resolve and the outputs stay out of the checkout). A `kunserve
serve` starts in the background and serves the commands after it until the next `kunserve
serve` or the end; the others run to completion. A curl whose answer is an error body counts
as failed. Skipped, with the reason: `pip install` (the environment is installed already;
--install runs it), the test suite (--with-tests runs it), what needs a GPU on a machine
without one, a Ray cluster of several hosts, and placeholders (/path/to/...).

    python benchmarks/readme_commands.py                 # every command, as written
    python benchmarks/readme_commands.py --only simulate  # those containing a word

Prints one line per command (ok / FAILED / skipped, seconds) and exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LINKED = ("data", "benchmarks", "docs")  # what the commands name by relative path
FENCE = re.compile(r"^```(\w*)\s*$")
DEFAULT_PORT = 8000
SERVER_START_TIMEOUT_S = 300.0  # spawning workers and loading on two busy cores
SERVER_POLL_S = 0.5
SERVER_STOP_GRACE_S = 30.0
ERROR_BODY = '"error":'  # an OpenAI-shaped error answer
# Why a command does not run here, by what it contains.
PLACEHOLDERS = ("/path/to/", "HOST_A_IP")
NEEDS_RAY = ("ray start", "--executor ray")
# GPU scripts, and dummy weights of a real model's config (speed runs: tens of GB per device).
NEEDS_GPU = ("benchmarks/check_gpu.py", "benchmarks/engine.py", "--load-format dummy")
NOT_SIMULATED = "kunserve simulate"  # the simulator runs the GPU presets on any machine
SKIP_INSTALL = "installs (the environment is installed already; --install runs it)"
SKIP_TESTS = "the test suite (--with-tests runs it)"
SKIP_PLACEHOLDER = "a placeholder to fill in"
SKIP_RAY = "needs a Ray cluster of several hosts"
SKIP_GPU = "needs a GPU"


@dataclass
class Command:
    kind: str  # "bash" | "python"
    text: str  # as written (bash: continuation lines joined)

    @property
    def is_server(self) -> bool:
        return self.kind == "bash" and self.text.startswith("kunserve serve")


def readme_commands(readme: Path = README) -> list[Command]:
    """Every bash command and python block of the README, in order."""
    commands: list[Command] = []
    language, block = None, []
    for line in readme.read_text().splitlines():
        fence = FENCE.match(line)
        if fence and language is None:
            language, block = fence.group(1), []
        elif fence:
            if language == "bash":
                commands += [Command("bash", text) for text in join_continuations(block)]
            elif language == "python":
                commands.append(Command("python", "\n".join(block)))
            language = None
        elif language is not None:
            block.append(line)
    return commands


def join_continuations(lines: list[str]) -> list[str]:
    """Lines ending in a backslash joined with the next; blank lines dropped."""
    joined, current = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1].rstrip() + " "
            continue
        current += line.strip() if current else line
        if current.strip():
            joined.append(current.strip())
        current = ""
    return joined


def code_of(command: Command) -> str:
    """The command without its comments (which may name placeholders)."""
    if command.kind == "bash":
        return shlex.join(shlex.split(command.text, comments=True))
    tokens = tokenize.generate_tokens(io.StringIO(command.text).readline)
    return " ".join(token.string for token in tokens if token.type != tokenize.COMMENT)


def skip_reason(command: Command, install: bool, with_tests: bool, has_gpu: bool) -> str | None:
    """Why `command` does not run here, or None."""
    text = code_of(command)
    if text.startswith("pip install") and not install and "&&" not in text:
        return SKIP_INSTALL
    if "pytest" in text and not with_tests:
        return SKIP_TESTS
    if any(marker in text for marker in PLACEHOLDERS):
        return SKIP_PLACEHOLDER
    if any(marker in text for marker in NEEDS_RAY):
        return SKIP_RAY
    if not has_gpu and not text.startswith(NOT_SIMULATED) and any(marker in text for marker in NEEDS_GPU):
        return SKIP_GPU
    return None


def runnable_text(command: Command, install: bool) -> str:
    """The shell text to run: README's first command installs, then runs; without --install
    only what follows the install runs."""
    if command.kind == "bash" and command.text.startswith("pip install") and "&&" in command.text and not install:
        return command.text.split("&&", 1)[1].strip()
    return command.text


class Server:
    """A `kunserve serve` command running in the background."""

    def __init__(self, text: str, workdir: Path, log: Path) -> None:
        self.port = server_port(text)
        self.log = log.open("w")
        self.process = subprocess.Popen(["bash", "-c", f"exec {text}"], cwd=workdir, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> bool:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=SERVER_POLL_S).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(SERVER_POLL_S)
        return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # a graceful stop (a background job may ignore SIGINT)
            try:
                self.process.wait(SERVER_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def server_port(text: str) -> int:
    tokens = shlex.split(text, comments=True)
    return int(tokens[tokens.index("--port") + 1]) if "--port" in tokens else DEFAULT_PORT


def run_one(command: Command, text: str, workdir: Path) -> tuple[bool, str]:
    """Run a command to completion; whether it succeeded and the last of its output."""
    argv = ["bash", "-c", text] if command.kind == "bash" else [sys.executable, "-c", text]
    done = subprocess.run(argv, check=False, cwd=workdir, capture_output=True, text=True)
    output = done.stdout + done.stderr
    failed = done.returncode != 0 or (text.startswith("curl") and ERROR_BODY in output)
    return not failed, output.strip()[-600:]


def prepare_workdir(path: Path | None) -> Path:
    workdir = Path(path or tempfile.mkdtemp(prefix="kunserve-readme-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if not (workdir / name).exists():
            (workdir / name).symlink_to(REPO / name)
    return workdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="also run the pip install commands")
    parser.add_argument("--with-tests", action="store_true", help="also run the test suite commands")
    parser.add_argument("--only", default=None, help="run only the commands containing this text")
    parser.add_argument("--workdir", type=Path, default=None, help="where to run (default: a new scratch directory)")
    args = parser.parse_args()
    import torch  # only to know whether a GPU is here

    has_gpu = torch.cuda.is_available()
    workdir = prepare_workdir(args.workdir)
    env_note = f"workdir {workdir}, GPU: {has_gpu}"
    print(env_note, flush=True)
    server: Server | None = None
    failures = 0
    for index, command in enumerate(readme_commands()):
        label = command.text.splitlines()[0][:110]
        reason = skip_reason(command, args.install, args.with_tests, has_gpu)
        if reason is None and args.only is not None and args.only not in command.text:
            reason = f"not selected (--only {args.only})"
        if reason is not None:
            print(f"skipped  {label}  ({reason})", flush=True)
            continue
        text = runnable_text(command, args.install)
        begin = time.perf_counter()
        if command.is_server:
            if server is not None:
                server.stop()
            server = Server(text, workdir, workdir / f"server_{index}.log")
            ok, tail = server.wait_ready(), f"log: {server.log.name}"
        else:
            ok, tail = run_one(command, text, workdir)
        failures += not ok
        print(f"{'ok' if ok else 'FAILED':8} {label}  ({time.perf_counter() - begin:.1f} s)", flush=True)
        if not ok:
            print("    " + tail.replace("\n", "\n    "), flush=True)
    if server is not None:
        server.stop()
    print(f"{failures} failed; {env_note}")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
