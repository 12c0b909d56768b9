"""Read the tensors of a Hugging Face-style checkpoint directory.

Safetensors files (single or sharded with `model.safetensors.index.json`) are memory-mapped and
checked against their headers before use, so a truncated download is refused with a clear line.
Pickled `.bin`/`.pt` weights run code when unpickled: they are read only with an explicit opt-in.
"""

from __future__ import annotations

import json
import math
import pickle
import stat
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from thrifty.errors import ThriftyError
from thrifty.files import read_json_object

PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth")
# Bytes per element of each safetensors dtype.
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def checkpoint_files(path: Path, *, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint directory, in shard order (a converted GGUF's: its
    GGUF file)."""
    from thrifty.loader.gguf_weights import gguf_source

    if (source := gguf_source(path)) is not None:
        return [source]
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) and Path(f).name == f for f in weight_map.values()
        ):
            raise ThriftyError(f"{index} is malformed: weight_map must map names to file names")
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


def _weight_file_size(file: Path) -> int:
    """The size of a weight file, which must be a regular file (not a FIFO, not /dev/zero)."""
    try:
        info = file.stat()
    except OSError as e:
        raise ThriftyError(f"{file}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ThriftyError(f"{file}: not a regular file")
    return info.st_size


def check_safetensors(file: Path) -> None:
    """Refuse a file whose header is unreadable or malformed, or whose data runs past its end.

    Each entry must name a known dtype, a shape of non-negative sizes and a data range of
    exactly the shape's bytes; the error names the tensor.
    """
    size = _weight_file_size(file)
    try:
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ThriftyError(f"{file} is not a valid safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ThriftyError(f"{file} is not a valid safetensors file: header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name != "__metadata__":
            end = max(end, _safetensors_entry_end(file, name, entry))
    if 8 + header_len + end > size:
        raise ThriftyError(
            f"{file} is truncated: its header needs {8 + header_len + end:,} bytes, "
            f"the file has {size:,}"
        )


def _safetensors_entry_end(file: Path, name: str, entry: Any) -> int:
    def bad(why: str) -> ThriftyError:
        return ThriftyError(f"{file} is not a valid safetensors file: tensor {name!r} {why}")

    if not isinstance(entry, dict):
        raise bad("is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise bad(f"has an unknown dtype {dtype!r}")

    def is_size(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(shape, list) or not all(map(is_size, shape)):
        raise bad(f"has a bad shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_size, offsets)):
        raise bad(f"has bad data_offsets {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if end - begin != nbytes:
        raise bad(f"has data_offsets {offsets} for {nbytes:,} bytes of {dtype} {shape}")
    return end


class TensorSlice:
    """A safetensors tensor not read yet: its shape, then a read of the whole or of one slice
    (safetensors' get_slice reads only the slice's bytes). Tensor parallelism's loader."""

    def __init__(self, handle: Any, name: str):
        self._slice = handle.get_slice(name)
        self.shape = torch.Size(self._slice.get_shape())
        self.dtype: str = self._slice.get_dtype()  # safetensors' name: "BF16", "F8_E4M3", ...

    def read(self, dim: int | None = None, start: int = 0, length: int = 0) -> torch.Tensor:
        if dim is None:
            return self._slice[:]
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._slice[tuple(index)]


def iter_tensors(
    path: Path, *, allow_pickle: bool = False, gguf_quantized: bool = False, sliced: bool = False
) -> Iterator[tuple[str, Any]]:
    """Yield (name, tensor) for every tensor of the checkpoint, memory-mapped where possible.

    A converted GGUF directory's tensors come from its GGUF file, dequantized to float32; with
    `gguf_quantized` those of a type with a native kernel come as GgufTensor instead, for the
    loader to keep quantized (thrifty/loader/gguf_weights.py). With `sliced`, safetensors
    tensors come as TensorSlice, for the loader to read only its rank's part.
    """
    from thrifty.loader.gguf_weights import gguf_source, iter_gguf_tensors

    if (source := gguf_source(path)) is not None:
        yield from iter_gguf_tensors(path, source, quantized=gguf_quantized)
        return
    for file in checkpoint_files(path, allow_pickle=allow_pickle):
        if file.suffix != ".safetensors":
            yield from _load_pickled(file).items()
            continue
        check_safetensors(file)
        try:
            f = safe_open(file, framework="pt")
        except SafetensorError as e:  # what check_safetensors does not look at (overlaps, ...)
            raise ThriftyError(f"{file} is not a valid safetensors file ({e})") from None
        with f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, TensorSlice(f, name) if sliced else f.get_tensor(name)


def _load_pickled(file: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, read by torch's weights-only unpickler: anything but tensors and
    plain containers (code to run, a custom class) is refused."""
    _weight_file_size(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler met a global it won't run
        why = (str(e).strip().splitlines() or ["unsupported content"])[0]
        raise ThriftyError(f"{file}: refused by the weights-only unpickler: {why}") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ThriftyError(f"{file} is not a readable torch.save file: {why}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ThriftyError(f"{file} is not a dict of named tensors (a state dict)")
    return state
