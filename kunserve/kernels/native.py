"""The C kernels in kunserve/kernels/csrc, compiled on first use for the machine they run on.

A kernel library is built once per (source and headers, compiler, flags, CPU) into a cache directory
($KUNSERVE_CACHE_DIR, else ~/.cache/kunserve) and loaded with ctypes: no Python headers, no
torch headers, so a build takes under a second and a process that finds the library in the
cache loads it in milliseconds. The libraries link the OpenMP runtime torch has loaded
(libgomp.so.1), so their threads are torch's threads, not a second pool competing for the cores.

Each library has its own floating-point flags (LIBRARY_FLAGS), beside the code that relies on
them: the attention kernel's reductions are free to reassociate, the fused elementwise kernels
round as torch does. `-ffast-math` is given to the compiler only, never to the link: linked into
a shared library it would set flush-to-zero for the whole process on load.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "csrc"
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # csrc/dtype.h's DTYPE_* codes: what the kernels read
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c11")
LIBRARY_FLAGS = {
    "cpu_attention": ("-ffast-math",),
    "cpu_fused": ("-fno-math-errno", "-ffp-contract=off"),
}
LINK_FLAGS = ("-shared", "-fopenmp")
LINK_LIBRARIES = ("-lm",)


class NativeBuildError(RuntimeError):
    """A C kernel library could not be compiled or loaded (no compiler, a failed build)."""


def cache_dir() -> Path:
    return Path(os.environ.get("KUNSERVE_CACHE_DIR") or Path.home() / ".cache" / "kunserve") / "native"


def _compiler() -> str:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise NativeBuildError(f"no C compiler: {compiler!r} is not on PATH (set CC to one)")
    return compiler


def _source_texts(source: Path) -> list[str]:
    """The source and every header beside it: a change to either is a new library."""
    return [path.read_text() for path in (source, *sorted(SOURCE_DIR.glob("*.h")))]


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


@cache
def load_library(name: str) -> ctypes.CDLL:
    """csrc/<name>.c built (or found in the cache) and loaded."""
    source = SOURCE_DIR / f"{name}.c"
    compiler = _compiler()
    flags = [*COMPILE_FLAGS, *LIBRARY_FLAGS[name]]
    key = hashlib.sha256(
        "\0".join([*_source_texts(source), compiler, *flags, *LINK_FLAGS, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    library = cache_dir() / f"{name}-{key}.so"
    if not library.exists():
        try:
            _build(compiler, flags, source, library)
        except OSError as error:  # an unwritable cache, a full disk
            raise NativeBuildError(f"cannot build into {library.parent} ({error}); set KUNSERVE_CACHE_DIR") from error
    try:
        return ctypes.CDLL(str(library))
    except OSError as error:
        raise NativeBuildError(f"cannot load {library}: {error}") from error


def _build(compiler: str, flags: list[str], source: Path, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    logger.info("compiling %s into %s", source.name, library)
    # Build beside the target and rename into place: processes building at once never load a
    # half-written file.
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        obj, shared = Path(scratch) / "kernel.o", Path(scratch) / "kernel.so"
        for command in (
            [compiler, *flags, "-c", str(source), "-o", str(obj)],
            [compiler, *LINK_FLAGS, str(obj), "-o", str(shared), *LINK_LIBRARIES],
        ):
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode:
                raise NativeBuildError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(shared, library)
