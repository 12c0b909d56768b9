"""Check a GGUF file's header and tensor table before anything trusts it, as llama.cpp's
gguf_init_from_file does.

Counts must fit in the file; a tensor has a known type, one to four positive dims and rows of
whole quantization blocks; its data is aligned, lies inside the data section and overlaps no
other tensor's. The first problem found is a one-line ThriftyError naming the file and the
tensor. gguf.GGUFReader trusts all of this: a wrapped-around offset, for one, reads another
tensor's bytes.
"""

from __future__ import annotations

import mmap
import struct
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from thrifty.errors import ThriftyError

VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME - 1
DEFAULT_ALIGNMENT = 32
_INT64_MAX = (1 << 63) - 1
# GGUF value types: sizes of the scalars; 8 is a string, 9 an array.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
# The fewest bytes one metadata entry (key length, type, a 1-byte value) and one tensor info
# (name length, a 1-byte name, n_dims, one dim, type, offset) can take.
_MIN_KV_BYTES, _MIN_TENSOR_INFO_BYTES = 8 + 4 + 1, 8 + 1 + 4 + 8 + 4 + 8


class TableEntry(NamedTuple):
    """One tensor of the table: where its bytes are in the file, once checked."""

    name: str
    dims: tuple[int, ...]  # innermost first, as GGUF lists them
    tensor_type: GGMLQuantizationType
    start: int  # byte offset in the file
    nbytes: int


class _Reader:
    """Reads the header front to back; reading past the end is a one-line error."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.pos, self.order = buf, path, 0, "<"

    def error(self, why: str) -> ThriftyError:
        return ThriftyError(f"{self.path}: not a valid GGUF file ({why})")

    def take(self, n: int) -> int:
        start = self.pos
        if n > len(self.buf) - start:
            raise self.error(f"truncated: {n:,} bytes needed at offset {start:,}")
        self.pos += n
        return start

    def uint(self, n: int) -> int:
        fmt = {4: "I", 8: "Q"}[n]
        return struct.unpack_from(self.order + fmt, self.buf, self.take(n))[0]

    def string(self) -> bytes:
        length = self.uint(8)
        start = self.take(length)
        return self.buf[start : start + length]

    def skip_strings(self, count: int, key: str) -> None:
        """Past `count` length-prefixed strings (a vocabulary: 50k-300k of them) in one tight
        loop: `take` and `uint` per string made this a third of a second of every load."""
        length = struct.Struct(self.order + "Q").unpack_from
        buf, pos, end = self.buf, self.pos, len(self.buf)
        for _ in range(count):
            if pos + 8 > end:  # also where the last length ran past the end
                break
            pos += 8 + length(buf, pos)[0]
        else:
            if pos <= end:
                self.pos = pos
                return
        raise self.error(f"truncated: the strings of key {key!r} run past the end of the file")

    def skip_value(self, kind: int, key: str) -> None:
        if kind in _SCALAR_BYTES:
            self.take(_SCALAR_BYTES[kind])
        elif kind == _STRING:
            self.take(self.uint(8))
        elif kind == _ARRAY:
            item, count = self.uint(4), self.uint(8)
            if item in _SCALAR_BYTES:
                self.take(count * _SCALAR_BYTES[item])
            elif item == _STRING:
                if count > (len(self.buf) - self.pos) // 8:
                    raise self.error(f"truncated: key {key!r} claims {count:,} strings")
                self.skip_strings(count, key)
            else:  # llama.cpp refuses nested arrays too
                raise self.error(f"key {key!r} is an array of type {item}")
        else:
            raise self.error(f"key {key!r} has an unknown type {kind}")


def check_gguf(path: Path) -> list[TableEntry]:
    """Refuse `path` in one line unless its header and tensor table are sound (see module doc);
    returns the table, in file order."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise ThriftyError(f"{path}: not a valid GGUF file (only {size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _check(_Reader(buf, path), size)


def _check(r: _Reader, size: int) -> list[TableEntry]:
    if r.buf[:4] != b"GGUF":
        raise r.error("no GGUF magic at the start")
    r.take(4)
    version = r.uint(4)
    if version & 0xFFFF == 0:  # written on a big-endian machine
        r.order = ">"
        version = struct.unpack(">I", r.buf[4:8])[0]
    if version not in VERSIONS:
        raise r.error(f"version {version}; thrifty reads versions {VERSIONS}")
    num_tensors, num_kv = r.uint(8), r.uint(8)
    if num_kv > (size - r.pos) // _MIN_KV_BYTES:
        raise r.error(f"{num_kv:,} metadata entries cannot fit in {size:,} bytes")
    if num_tensors > (size - r.pos) // _MIN_TENSOR_INFO_BYTES:
        raise r.error(f"{num_tensors:,} tensors cannot fit in {size:,} bytes")

    alignment = DEFAULT_ALIGNMENT
    for _ in range(num_kv):
        key = r.string().decode("utf-8", "replace")
        kind = r.uint(4)
        if key == "general.alignment":
            if kind != _UINT32:
                raise r.error("general.alignment is not a uint32")
            alignment = r.uint(4)
            if alignment == 0 or alignment & (alignment - 1):
                raise r.error(f"general.alignment {alignment} is not a power of two")
            continue
        r.skip_value(kind, key)

    tensors: list[tuple[int, int, str]] = []  # (offset, bytes, name)
    infos: list[tuple[tuple[int, ...], GGMLQuantizationType]] = []
    names: set[str] = set()
    for i in range(num_tensors):
        raw = r.string()
        name = raw.decode("utf-8", "replace")
        if len(raw) > MAX_NAME_BYTES:
            raise r.error(f"tensor {i}'s name is {len(raw)} bytes, over {MAX_NAME_BYTES}")
        if name in names:
            raise r.error(f"tensor {name!r} appears twice")
        names.add(name)
        offset, nbytes, dims, tensor_type = _tensor_info(r, name)
        tensors.append((offset, nbytes, name))
        infos.append((dims, tensor_type))

    data_start = -(-r.pos // alignment) * alignment
    data_bytes = size - data_start
    for offset, nbytes, name in tensors:
        if offset % alignment:
            raise _tensor_error(r, name, f"offset {offset:,} is not a multiple of {alignment}")
        if offset + nbytes > data_bytes:
            raise _tensor_error(
                r,
                name,
                f"needs bytes {offset:,}..{offset + nbytes:,} of a data section of "
                f"{max(data_bytes, 0):,} (truncated or corrupt)",
            )
    table = [
        TableEntry(name, dims, kind, data_start + offset, nbytes)
        for (offset, nbytes, name), (dims, kind) in zip(tensors, infos, strict=True)
    ]
    tensors.sort()
    for (offset, nbytes, name), (next_offset, _, next_name) in pairwise(tensors):
        if next_offset < offset + nbytes:
            raise _tensor_error(
                r,
                next_name,
                f"at offset {next_offset:,} overlaps tensor {name!r} "
                f"(bytes {offset:,}..{offset + nbytes:,})",
            )
    return table


def _tensor_info(r: _Reader, name: str) -> tuple[int, int, tuple[int, ...], GGMLQuantizationType]:
    """(offset in the data section, bytes, dims, type) of the tensor whose info follows its
    name."""
    n_dims = r.uint(4)
    if not 1 <= n_dims <= MAX_DIMS:
        raise _tensor_error(r, name, f"has {n_dims} dims (1 to {MAX_DIMS} allowed)")
    dims = [r.uint(8) for _ in range(n_dims)]
    if not all(0 < d <= _INT64_MAX for d in dims):
        raise _tensor_error(r, name, f"has dims {dims}; each must be positive")
    raw_type = r.uint(4)
    try:
        tensor_type = GGMLQuantizationType(raw_type)
        block, type_bytes = GGML_QUANT_SIZES[tensor_type]
    except (ValueError, KeyError):
        raise _tensor_error(r, name, f"has an unknown type {raw_type}") from None
    if dims[0] % block:
        raise _tensor_error(
            r, name, f"has rows of {dims[0]} values, not a multiple of its type's {block}-block"
        )
    elements = 1
    for d in dims:
        elements *= d
    if elements > _INT64_MAX:
        raise _tensor_error(r, name, f"has {elements:,} elements")
    offset = r.uint(8)
    return offset, elements // block * type_bytes, tuple(dims), tensor_type


def _tensor_error(r: _Reader, name: str, why: str) -> ThriftyError:
    return ThriftyError(f"{r.path}: GGUF tensor {name!r} {why}")
