"""Reading a checkpoint's small files (JSON configs, tokenizer, chat template) from untrusted paths.

Only regular files are read, and only up to MAX_FILE_BYTES: a tokenizer.json linked to /dev/zero
or replaced by a FIFO is refused in one line instead of being read until memory runs out (or
forever). Symlink loops, undecodable text and malformed JSON are one-line errors too.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from thrifty.errors import ThriftyError

# Far above any real tokenizer.json (Qwen's is 7 MB, the largest vocabularies ~30 MB).
MAX_FILE_BYTES = 512 << 20


def present(path: Path) -> bool:
    """Whether `path` names something, even a dangling link or a loop (reading it then says what
    is wrong with it, where exists() would call it missing)."""
    return path.is_symlink() or path.exists()


def read_bytes(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The contents of the regular file `path`, refused in one line if it is anything else."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ThriftyError(f"{path}: no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ThriftyError(f"{path}: too many levels of symbolic links (a loop?)") from None
        raise ThriftyError(f"{path}: cannot open: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ThriftyError(f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise ThriftyError(
                f"{path}: {info.st_size:,} bytes is more than the {max_bytes:,} read for such "
                "a file"
            )
        data = f.read(max_bytes + 1)  # the file may have grown since fstat
    if len(data) > max_bytes:
        raise ThriftyError(f"{path}: more than the {max_bytes:,} bytes read for such a file")
    return data


def read_text(path: Path, max_bytes: int = MAX_FILE_BYTES) -> str:
    try:
        return read_bytes(path, max_bytes).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ThriftyError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (all of a checkpoint's JSON files do)."""
    try:
        obj = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ThriftyError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ThriftyError(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ThriftyError(f"{path} must hold a JSON object, not a {type(obj).__name__}")
    return obj
