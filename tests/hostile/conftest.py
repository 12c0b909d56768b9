"""Fixtures of the hostile tests: a private cache, and the CLI run in this process."""

from __future__ import annotations

from pathlib import Path

import pytest

from thrifty import cli


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private thrifty cache for the test."""
    home = tmp_path / "home"
    monkeypatch.setenv("THRIFTY_HOME", str(home))
    return home


@pytest.fixture
def thrifty(capsys):
    """Run the CLI in this process: returns (exit code, stdout, stderr lines)."""

    def run(*argv: str) -> tuple[int, str, list[str]]:
        try:
            code = cli.main(list(argv))
        except SystemExit as e:  # argparse refusals
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err.splitlines()

    return run
