"""Issue 18, item 8: each C++ kernel is built once per install, a failed build says what runs
instead, and `thrifty serve` builds the kernels before it loads the model and reports ready.

The builds here are of tiny sources in a private TORCH_EXTENSIONS_DIR: one that does not compile
fails in well under a second.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.hostile.tiny import write_tiny_hf
from thrifty import kernels
from thrifty.engine import llm_engine
from thrifty.kernels import build
from thrifty.kernels.build import Kernel, build_dir
from thrifty.server import app

BROKEN = "#error this kernel does not compile\n"


@pytest.fixture(autouse=True)
def extensions_dir(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(directory))
    monkeypatch.setattr(build, "_LOADED", {})  # each test's kernels are tried afresh
    return directory


def source(path: Path, text: str = "int f() { return 1; }\n") -> Path:
    path.write_text(text)
    return path


def fake_compiler(path: Path, version: str) -> str:
    path.write_text(f"#!/bin/sh\necho '{version}'\n")
    path.chmod(0o755)
    return str(path)


def test_build_dir_is_stable_and_private_to_thrifty(tmp_path, extensions_dir):
    src = source(tmp_path / "a.cpp")
    first = build_dir("thrifty_x", src, ("-O3",))
    assert first == build_dir("thrifty_x", src, ("-O3",))
    assert first.parent == extensions_dir / "thrifty" and first.name.startswith("thrifty_x-")


def test_build_dir_follows_the_source_and_flags(tmp_path):
    a = source(tmp_path / "a.cpp")
    b = source(tmp_path / "b.cpp", "int f() { return 2; }\n")
    assert build_dir("thrifty_x", a, ()) != build_dir("thrifty_x", b, ())
    assert build_dir("thrifty_x", a, ()) != build_dir("thrifty_x", a, ("-O3",))


def test_build_dir_follows_the_compiler(tmp_path, monkeypatch):
    src = source(tmp_path / "a.cpp")
    monkeypatch.setenv("CXX", fake_compiler(tmp_path / "gcc13", "c++ (Debian 13.2.0-25) 13.2.0"))
    gcc13 = build_dir("thrifty_x", src, ())
    monkeypatch.setenv("CXX", fake_compiler(tmp_path / "gcc14", "c++ (Debian 14.2.0-19) 14.2.0"))
    assert build_dir("thrifty_x", src, ()) != gcc13


def test_build_dir_follows_the_install(tmp_path, monkeypatch):
    # Two installs (another venv, another checkout) or torch versions never share a build.
    src = source(tmp_path / "a.cpp")
    here = build_dir("thrifty_x", src, ())
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "2.99.0")
        assert build_dir("thrifty_x", src, ()) != here
    with monkeypatch.context() as m:
        m.setattr(build, "__file__", str(tmp_path / "other" / "thrifty" / "kernels" / "build.py"))
        assert build_dir("thrifty_x", src, ()) != here
    assert build_dir("thrifty_x", src, ()) == here


def test_failed_build_warns_once_naming_the_fallback(tmp_path, caplog):
    kernel = Kernel("thrifty_test_broken", source(tmp_path / "b.cpp", BROKEN), (), "the torch path")
    lines: list[str] = []
    with caplog.at_level(logging.WARNING, logger="thrifty.kernels"):
        assert kernel.load(lines.append) is None
        assert kernel.load(lines.append) is None  # tried once a process, warned once
    assert lines == ["thrifty: building the thrifty_test_broken CPU kernels (once per install)"]
    [record] = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING and "\n" not in message
    assert message.startswith(
        "thrifty: warning: the thrifty_test_broken CPU kernels failed to build"
    )
    assert "this kernel does not compile" in message and "using the torch path instead" in message


def test_serve_builds_the_kernels_before_the_model_and_ready(tmp_path, monkeypatch, thrifty):
    broken = Kernel("thrifty_test_serve", source(tmp_path / "s.cpp", BROKEN), (), "the torch path")
    monkeypatch.setattr(kernels, "_all_kernels", lambda: (broken,))
    order = []

    def engine(*args, **kwargs):
        order.append(("engine", "thrifty_test_serve" in build._LOADED))
        return "engine"

    def serve(load, config, host, port):  # app.serve: load() on the engine thread, then ready
        assert load() == "engine"
        order.append("ready")

    monkeypatch.setattr(llm_engine, "LLMEngine", engine)
    monkeypatch.setattr(app, "serve", serve)
    code, out, err = thrifty("serve", str(write_tiny_hf(tmp_path / "m")), "--port", "0")
    assert code == 0
    assert order == [("engine", True), "ready"]
    assert err == ["thrifty: building the thrifty_test_serve CPU kernels (once per install)"]
    assert out == "thrifty: CPU kernels: thrifty_test_serve -> the torch path\n"


def test_prepare_says_what_each_kernel_runs_on(tmp_path, monkeypatch, caplog):
    ok = Kernel("thrifty_ok", source(tmp_path / "ok.cpp"), (), "-")
    broken = Kernel("thrifty_broken", source(tmp_path / "b.cpp", BROKEN), (), "the torch path")
    unsupported = Kernel("thrifty_avx9", source(tmp_path / "u.cpp"), (), "torch's matmul",
                         supported=lambda: False)  # fmt: skip
    monkeypatch.setattr(kernels, "_all_kernels", lambda: (ok, broken, unsupported))
    build._LOADED["thrifty_ok"] = torch  # as if built: any module
    with caplog.at_level(logging.INFO, logger="thrifty.kernels"):
        line = kernels.prepare(lambda _: None)
    assert line == (
        "thrifty: CPU kernels: thrifty_ok compiled, thrifty_broken -> the torch path,"
        " thrifty_avx9 -> torch's matmul"
    )
    levels = {name: r.levelno for r in caplog.records for name in ("thrifty_broken", "thrifty_avx9")
              if name in r.getMessage()}  # fmt: skip
    # A failed build is a fault, warned; a kernel this CPU cannot run is a choice (an AVX2-only
    # CPU skips the AVX-512 ones on every start), logged as information and named in the line.
    assert levels == {"thrifty_broken": logging.WARNING, "thrifty_avx9": logging.INFO}


TINY = """#include <Python.h>
static PyModuleDef def_ = {PyModuleDef_HEAD_INIT, "thrifty_tiny", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit_thrifty_tiny() { return PyModule_Create(&def_); }
"""

LOAD_IN_A_FRESH_PROCESS = """
import sys
from pathlib import Path
from thrifty.kernels.build import Kernel
module = Kernel("thrifty_tiny", Path(sys.argv[1]), (), "-").load()
print(module.__name__, "torch.utils.cpp_extension" in sys.modules)
"""


def test_a_built_kernel_is_imported_as_it_is_and_a_damaged_one_rebuilt(tmp_path, extensions_dir):
    # Starting a process should not pay for torch's loader (setuptools, a ninja run per kernel)
    # when the build directory, keyed by everything the build depends on, already holds it.
    src = source(tmp_path / "tiny.cpp", TINY)
    assert Kernel("thrifty_tiny", src, (), "-").load() is not None  # built through torch
    built = build_dir("thrifty_tiny", src, ()) / "thrifty_tiny.so"

    def fresh_load() -> str:
        proc = subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(src)],
                              capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
        return proc.stdout.strip()

    assert fresh_load() == "thrifty_tiny False"
    head = built.read_bytes()[:100]
    built.unlink()  # a new file: this process has the old one mapped
    built.write_bytes(head)  # as a killed link could leave it
    assert fresh_load() == "thrifty_tiny True"  # torch built it again
    assert built.stat().st_size > 100
