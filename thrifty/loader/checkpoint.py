"""Read the tensors of a Hugging Face-style checkpoint directory.

Safetensors files (single or sharded with `model.safetensors.index.json`) are memory-mapped and
checked against their headers before use, so a truncated download is refused with a clear line.
Pickled `.bin`/`.pt` weights run code when unpickled: they are read only with an explicit opt-in.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from thrifty.errors import ThriftyError

PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth")


def checkpoint_files(path: Path, *, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint directory, in shard order."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ThriftyError(f"{index} is malformed: {e}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ThriftyError(f"{path}: shard(s) listed in the index are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted({f for pattern in PICKLE_PATTERNS for f in path.glob(pattern)})
    if pickled and not allow_pickle:
        raise ThriftyError(
            f"{path} holds only pickled weights ({pickled[0].name}); unpickling can run code, "
            "so pass --allow-pickle (allow_pickle=True) if you trust this checkpoint"
        )
    if pickled:
        return pickled
    raise ThriftyError(f"no weights (*.safetensors) found in {path}")


def check_safetensors(file: Path) -> None:
    """Refuse a file whose header is unreadable or whose data runs past its end."""
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ThriftyError(f"{file} is not a valid safetensors file ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ThriftyError(
            f"{file} is truncated: its header needs {8 + header_len + end:,} bytes, "
            f"the file has {size:,}"
        )


def iter_tensors(path: Path, *, allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the checkpoint, memory-mapped where possible."""
    for file in checkpoint_files(path, allow_pickle=allow_pickle):
        if file.suffix != ".safetensors":
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            continue
        check_safetensors(file)
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)
