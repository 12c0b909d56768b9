"""Building the C++ kernels: where, when, and what happens when a build fails.

Each extension is built by torch.utils.cpp_extension (a C++ compiler and ninja) into its own
directory, keyed by everything the binary depends on: its source and headers, the flags, the
compiler's and ninja's versions, and the install (torch, Python, this package's path). Two
installs on one machine, or two torch versions, never rebuild each other's extension, and an
edited source gets a fresh build. A build that fails is a warning naming what runs instead.

Because the directory names everything the binary was built from, a `.so` already in it is
imported as it is: torch's loader (which imports setuptools and runs ninja to check each
build's timestamps) cost 0.35-0.45 s of every start here, most of a SmolLM2 load.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from thrifty.errors import ThriftyError

logger = logging.getLogger("thrifty.kernels")

CSRC = Path(__file__).parent / "csrc"
_STALE_LOCK_S = 600  # a build takes about a minute; an older lock was left by a killed build
_LOADED: dict[str, ModuleType | None] = {}  # by extension name: each is tried once a process


# THRIFTY_CPU_ISA=avx2 hides the CPU's AVX-512 and AMX from the kernel choice, so that a CPU
# with them runs (and its tests and benchmarks check) the kernels an AVX2-only CPU runs: the
# GGUF, FP8 and bf16 builds chosen by flags, and the ops built with -march=native built
# without AVX-512 (kernels/__init__.py).
ISA_ENV = "THRIFTY_CPU_ISA"
_CAPPED_PREFIXES = ("avx512", "amx")


def isa_capped() -> bool:
    """Whether THRIFTY_CPU_ISA asks for AVX2 at most ("avx2"); unset or "native": what the CPU
    has. Anything else is an error, rather than a silent choice."""
    value = os.environ.get(ISA_ENV, "native").strip().lower() or "native"
    if value not in ("native", "avx2"):
        raise ThriftyError(f"${ISA_ENV}={value!r}: choose native (the default) or avx2")
    return value == "avx2"


@functools.cache
def cpu_has(flags: tuple[str, ...]) -> bool:
    """Whether this CPU reports every one of `flags` (names as in /proc/cpuinfo), less what
    THRIFTY_CPU_ISA hides."""
    if isa_capped() and any(f.startswith(_CAPPED_PREFIXES) for f in flags):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.partition(":")[2].split())
    return all(f in have for f in flags)


@dataclass(frozen=True)
class Kernel:
    """One C++ extension: its source, compiler flags, and the torch code that runs without it."""

    name: str
    source: Path
    cflags: tuple[str, ...]
    fallback: str  # what runs where it cannot be built, for the warning
    supported: Callable[[], bool] = lambda: True  # whether this CPU can run it at all

    def build_dir(self) -> Path:
        return build_dir(self.name, self.source, self.cflags)

    def built(self) -> bool:
        return (self.build_dir() / f"{self.name}.so").is_file()

    def load(self, announce: Callable[[str], None] | None = None) -> ModuleType | None:
        """The extension, built on the first call of the process (None: use the fallback).

        `announce` gets one line before a build that will compile (a minute or more).
        """
        if self.name not in _LOADED:
            _LOADED[self.name] = self._load(announce)
        return _LOADED[self.name]

    def _load(self, announce: Callable[[str], None] | None) -> ModuleType | None:
        if not self.supported():  # a choice made from the CPU's features, not a fault
            logger.info("thrifty: this CPU cannot run the %s kernels; using %s", self.name,
                        self.fallback)  # fmt: skip
            return None
        try:
            if announce is not None and not self.built():
                announce(f"thrifty: building the {self.name} CPU kernels (once per install)")
            return compile_extension(self.name, self.source, list(self.cflags))
        except Exception as e:  # no compiler, no ninja, a failed build: run on the fallback
            logger.warning(
                "thrifty: warning: the %s CPU kernels failed to build (%s); using %s instead "
                "(build files in %s)",
                self.name,
                _reason(e),
                self.fallback,
                self.build_dir(),
            )
            return None


def build_dir(name: str, source: Path, cflags: tuple[str, ...] | list[str]) -> Path:
    """The directory extension `name` is built in: one per source text (headers included),
    flags, compiler, ninja and install."""
    _ensure_ninja()
    key = hashlib.sha256()
    for path in (Path(source), *sorted(CSRC.glob("*.h"))):
        key.update(path.read_bytes() + b"\0")
    install = (torch.__version__, sys.version, str(Path(__file__).resolve().parent))
    tools = (_version(os.environ.get("CXX") or "c++"), _version("ninja"))
    for part in (*cflags, *tools, *install):
        key.update(part.encode() + b"\0")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or _default_build_root()
    return Path(root) / "thrifty" / f"{name}-{key.hexdigest()[:16]}"


def _default_build_root() -> str:
    """torch.utils.cpp_extension.get_default_build_root(), without importing that module."""
    try:
        from torch import _appdirs
    except ImportError:  # a torch that moved it
        from torch.utils.cpp_extension import get_default_build_root

        return get_default_build_root()
    return os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions"))


def compile_extension(name: str, source: Path, cflags: list[str]) -> ModuleType:
    """Build (unless built) and import extension `name` from one C++ source file."""
    directory = build_dir(name, source, cflags)
    built = directory / f"{name}.so"
    lock = directory / "lock"
    if built.is_file() and not lock.exists():  # a lock: a build may be writing it now
        try:
            return _import(name, built)
        except ImportError as e:  # damaged (a killed link): torch builds it again
            logger.info("thrifty: rebuilding %s (%s)", built, _reason(e))
            built.unlink(missing_ok=True)  # newer than its objects, ninja would keep it
    from torch.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        lock.unlink(missing_ok=True)  # torch would wait on it forever
    return load(
        name=name,
        sources=[str(source)],
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
    )


def _import(name: str, path: Path) -> ModuleType:
    """Extension module `name` from its built `.so`, as torch's loader imports it."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module spec for {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ensure_ninja() -> None:
    if shutil.which("ninja") is None:
        # pip's `ninja` puts its binary next to the interpreter, which may not be on PATH.
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def _version(tool: str) -> str:
    """The first line of `tool --version` ('' where it does not run), asked once a process."""
    try:
        proc = subprocess.run(
            [tool, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return (proc.stdout.strip().splitlines() or [""])[0]


def _reason(e: Exception) -> str:
    """The line of a failed build that says why: the compiler's first error, else the first."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and "Error building" not in ln]
    return ((errors or lines or [type(e).__name__])[0])[:200]
