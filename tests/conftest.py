"""Shared fixtures: the real models, fetched once into the thrifty cache (THRIFTY_HOME)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from thrifty import hub

# A shell's background job (`pytest ... &`) starts with SIGINT ignored, and servers the tests
# launch would inherit that and could not be stopped by Ctrl-C as a user's can (the shutdown
# test checks its exit code). A handler of our own is reset to the default in each child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# `thrifty run` answers through a thrifty serve on this machine that has the model loaded
# (thrifty/client.py): a developer's own server at the default address must not answer the
# tests' runs, which load the model themselves unless a test points them at its server.
os.environ["THRIFTY_LOCAL_URL"] = "http://127.0.0.1:1"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return hub.pull("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="session")
def qwen_gguf() -> Path:
    return hub.pull("qwen2.5-coder-0.5b-instruct", progress=False)


@pytest.fixture(scope="session")
def smollm2_fp32():
    from thrifty import LLM

    return LLM("smollm2-135m-instruct", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def transformers_gguf():
    """Load transformers' own model from a GGUF file (fp32), once per file per session."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def load(gguf: Path):
        if gguf not in cache:
            cache[gguf] = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            ).eval()
        return cache[gguf]

    return load


def pytest_sessionstart(session):
    """Build the C++ kernels once, before the first test, as `thrifty serve` does at start-up.

    On a fresh machine the first test to touch a kernel would otherwise build it mid-test, and
    a test of what a command prints would see the one-time "building ..." lines.
    """
    from thrifty import kernels

    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    say = terminal.write_line if terminal is not None else print
    line = kernels.prepare(say)
    if terminal is not None and terminal.verbosity >= 0:
        say(line)


# `pytest --tensor-parallel-size N`: read by launch() in test_server.py, which starts the servers.
TENSOR_PARALLEL_ENV = "THRIFTY_TEST_TENSOR_PARALLEL_SIZE"


def pytest_addoption(parser):
    parser.addoption(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="start the servers of the server tests with this many ranks (thrifty serve"
        " --tensor-parallel-size N): the same tests against a tensor-parallel server",
    )


def pytest_configure(config):
    size = config.getoption("--tensor-parallel-size")
    if size > 1:
        os.environ[TENSOR_PARALLEL_ENV] = str(size)
