"""Collectives of CPU ranks on one host through one shared-memory segment.

Gloo carries each collective over loopback TCP: on two busy cores a round trip costs about 2 ms,
and batch-1 decode needs some 64 of them a token. Ranks on one host instead write their part
into a segment they all map, publish a counter, and read the others' parts once every counter
says they are there (in C++: kernels/csrc/shm_sync.h): microseconds.

The segment: one 64-byte counter line per rank (padded to a page), then two buffers of one slot
of `capacity` bytes per rank. A collective is one round, or several for a tensor larger than a
slot; round n uses buffer n % 2: a rank that has seen every counter reach n - 1 knows every rank
finished reading round n - 2, so it may overwrite that buffer without a second wait. Every rank sums
the slots in rank order, so every rank gets the same bits.

A rank waiting on its peers checks, each second, that they still run: a rank that died raises
RuntimeError (as gloo does when its peer goes away) instead of a wait forever.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from thrifty import kernels

PAGE = 4096
LINE = 64  # bytes of each rank's counter: a cache line of its own
CAPACITY = 1 << 20  # bytes of a rank's slot: a decode step's tensors take one round


def segment_bytes(world: int, capacity: int) -> int:
    return _header(world) + 2 * world * capacity


def _header(world: int) -> int:
    return -(-world * LINE // PAGE) * PAGE


class ShmGroup:
    """This rank's view of the segment at `path` (made by rank 0, sized by `segment_bytes`).
    `peers`: every rank's process id, None for those not to watch (this one)."""

    def __init__(self, path: Path, rank: int, world: int, peers: list[int | None], capacity: int):
        fd = os.open(path, os.O_RDWR)
        try:
            self.mm = mmap.mmap(fd, segment_bytes(world, capacity))
        finally:
            os.close(fd)
        self.rank, self.capacity = rank, capacity
        seg = torch.frombuffer(self.mm, dtype=torch.uint8)
        pids = [-1 if pid is None else pid for pid in peers]
        self.group = kernels.cpu_ops().ShmGroup(seg, rank, world, _header(world), capacity, pids)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place."""
        if x.is_contiguous():
            self.group.all_reduce(x)
        else:
            y = x.contiguous()
            self.group.all_reduce(y)
            x.copy_(y)
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x (the same shape on every rank), in rank order."""
        return list(self.group.all_gather(x).unbind(0))

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's picklable `obj`, on every rank (rank 0 gets its own back). Each round
        carries the pickle's length in its first 8 bytes, then the next slot's worth of it."""
        room = self.capacity - 8
        if self.rank == 0:
            data = memoryview(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
            for start in range(0, max(len(data), 1), room):
                chunk = data[start : start + room]
                at = self.group.offset((self.group.seq + 1) % 2, 0)  # rank 0's slot, next round
                self.mm[at : at + 8] = len(data).to_bytes(8, "little")
                self.mm[at + 8 : at + 8 + len(chunk)] = chunk
                self.group.sync()
            return obj
        got = bytearray()
        while True:
            at = self.group.offset((self.group.seq + 1) % 2, 0)
            self.group.sync()
            total = int.from_bytes(self.mm[at : at + 8], "little")
            got += self.mm[at + 8 : at + 8 + min(room, total - len(got))]
            if len(got) >= total:
                return pickle.loads(got)

    def close(self) -> None:
        self.group = None
        with contextlib.suppress(BufferError):  # a view still alive: the mapping dies with it
            self.mm.close()
