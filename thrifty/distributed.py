"""The process group of tensor and expert parallelism: rank, world size, collectives, the step.

One group spans every rank: attention heads (whole KV-head groups), MLP columns and the vocabulary
are split across all of them (tensor parallel) and so are a MoE layer's experts (expert parallel,
EP = TP), in near-equal contiguous runs where the ranks do not divide them (`Shard`). Rank 0 runs
the scheduler and samples; each step it broadcasts the batch (`broadcast_step`) and every rank
runs the same forward on its shards. Gloo on the CPU, NCCL on CUDA; CPU ranks on one host send
the hot path's collectives (all-reduce, all-gather, the step) through shared memory instead
(`shm_group`), unless THRIFTY_SHM_COLLECTIVES=0.

With one process (the default) the group is never made: layers are built whole and nothing here
runs on the hot path.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from thrifty.errors import ThriftyError
from thrifty.shm_group import CAPACITY, ShmGroup, segment_bytes

_rank = 0
_world_size = 1
_shm: ShmGroup | None = None  # ranks on one host (CPU): the collectives below go through it


def rank() -> int:
    return _rank


def world_size() -> int:
    return _world_size


def init(rank: int, world_size: int, init_method: str, device: str) -> str:
    """Join the group as `rank`; returns this rank's device (cuda:<rank> for a CUDA device)."""
    global _rank, _world_size, _shm
    if device.partition(":")[0] == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        # Loading a large model on a slow disk can hold one rank for minutes.
        timeout=datetime.timedelta(minutes=30),
    )
    _rank, _world_size = rank, world_size
    if backend == "gloo" and os.environ.get("THRIFTY_SHM_COLLECTIVES", "1") != "0":
        _shm = _join_shared_memory()
    return device


def transport() -> str:
    """How the hot path's collectives travel: "shared memory", or the backend's name."""
    return "shared memory" if _shm is not None else dist.get_backend()


def close() -> None:
    global _rank, _world_size, _shm
    if _shm is not None:
        _shm.close()
        _shm = None
    if dist.is_initialized():
        dist.destroy_process_group()
    _rank, _world_size = 0, 1


def _join_shared_memory() -> ShmGroup | None:
    """Every rank maps one segment that rank 0 makes in /dev/shm, if they all run on this host
    (and the segment can be made and the compiled counters loaded); None leaves gloo to carry
    everything. The file is unlinked once every rank has mapped it: nothing is left behind,
    however the ranks end."""
    from thrifty import kernels

    # Decided from what every rank says, so that all of them take the same way.
    ranks = gather_object((socket.gethostname(), os.getpid(), kernels.cpu_ops_available()))
    if len({host for host, _, _ in ranks}) > 1 or not all(ops for _, _, ops in ranks):
        return None
    box: list[Any] = [None]
    if _rank == 0:
        box[0] = _make_segment()
    dist.broadcast_object_list(box, src=0)
    group = None
    if box[0] is not None:
        peers = [None if r == _rank else pid for r, (_, pid, _) in enumerate(ranks)]
        with contextlib.suppress(OSError):
            group = ShmGroup(box[0], _rank, _world_size, peers, CAPACITY)
    mapped = gather_object(group is not None)
    if _rank == 0 and box[0] is not None:
        box[0].unlink()
    if not all(mapped):
        if group is not None:
            group.close()
        return None
    return group


def _make_segment() -> Path | None:
    """A new file in /dev/shm with room for the group's segment, its memory reserved now (an
    overfull tmpfs fails here, not with a SIGBUS mid-step); None where it cannot be made."""
    path = Path("/dev/shm") / f"thrifty-tp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, segment_bytes(_world_size, CAPACITY))
    except (OSError, AttributeError):
        path.unlink()
        return None
    finally:
        os.close(fd)
    return path


def chunk(total: int, groups: int, index: int) -> tuple[int, int]:
    """(start, size) of chunk `index` when `total` things are cut into `groups` near-equal
    contiguous chunks: the first total % groups chunks hold one more."""
    base, extra = divmod(total, groups)
    return index * base + min(index, extra), base + (index < extra)


@dataclass(frozen=True)
class Shard:
    """How a weight splits across the ranks along `dim`: each of its merged `parts` (q, k, v, or
    gate, up; one part when not merged) on its own, cut into whole `units` (a part's rows per
    head or per KV-head group; single rows by default) dealt to the ranks in near-equal
    contiguous runs, the first ranks one unit more where they do not divide (SmolLM2's 3 KV
    heads over 2 ranks: 2 and 1). `replicas[i]` ranks share one slice of part i: KV heads fewer
    than the ranks are replicated, each rank keeping the head its queries read."""

    dim: int
    parts: tuple[int, ...]
    units: tuple[int, ...] | None = None
    replicas: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for i, part in enumerate(self.parts):
            unit, copies = self._unit(i), self._copies(i)
            if part % unit or part // unit < _world_size // copies:
                raise ThriftyError(
                    f"tensor parallelism over {_world_size} ranks cannot split a weight of "
                    f"{part} {'rows' if self.dim == 0 else 'columns'} into {_world_size // copies}"
                    f" runs of whole {unit}s"
                )

    def _unit(self, part: int) -> int:
        return self.units[part] if self.units else 1

    def _copies(self, part: int) -> int:
        return self.replicas[part] if self.replicas else 1

    def slice(self, part: int = 0, rank: int | None = None) -> tuple[int, int]:
        """(start, size) along `dim` of part `part` on `rank` (default: this rank)."""
        unit, copies = self._unit(part), self._copies(part)
        r = _rank if rank is None else rank
        start, size = chunk(self.parts[part] // unit, _world_size // copies, r // copies)
        return start * unit, size * unit

    def size(self, part: int = 0, rank: int | None = None) -> int:
        return self.slice(part, rank)[1]

    def start(self, part: int = 0, rank: int | None = None) -> int:
        return self.slice(part, rank)[0]

    def sizes(self, part: int = 0) -> list[int]:
        """Every rank's size of part `part`, in rank order."""
        return [self.size(part, r) for r in range(_world_size)]

    @property
    def local(self) -> int:
        return sum(self.size(i) for i in range(len(self.parts)))


def kv_head_replicas(num_heads: int, num_kv_heads: int) -> int:
    """Ranks sharing each KV head: 1 when there are at least as many KV heads as ranks (they
    split, unevenly where they must), world / KV heads when fewer (each rank then takes an equal
    share of its KV head's queries)."""
    if num_kv_heads >= _world_size:
        return 1
    if _world_size % num_kv_heads or num_heads % _world_size:
        raise ThriftyError(
            f"{num_kv_heads} KV heads ({num_heads} query heads) cannot be replicated evenly over "
            f"{_world_size} ranks"
        )
    return _world_size // num_kv_heads


def local_kv_heads(num_heads: int, num_kv_heads: int) -> int:
    """KV heads this rank caches: its run of them, or the one it shares. Rank 0 holds the most,
    so its cache, the one the scheduler counts blocks of, has the fewest blocks of any rank."""
    copies = kv_head_replicas(num_heads, num_kv_heads)
    return chunk(num_kv_heads, _world_size // copies, _rank // copies)[1]


# -- collectives (called only when world_size() > 1) --


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the ranks, in place: the one reduction of row-parallel layers."""
    if _shm is not None:
        return _shm.all_reduce(x)
    dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int, sizes: list[int] | None = None) -> torch.Tensor:
    """Every rank's x, concatenated along `dim` in rank order. `sizes`: each rank's length
    along `dim` where they differ; gloo gathers equal shapes only, so each x is padded to the
    largest and trimmed back."""
    most = max(sizes) if sizes else x.shape[dim]
    if x.shape[dim] < most:
        pad = list(x.shape)
        pad[dim] = most - x.shape[dim]
        x = torch.cat((x, x.new_zeros(pad)), dim=dim)
    if _shm is not None:
        parts = _shm.all_gather(x)
    else:
        parts = [torch.empty_like(x) for _ in range(_world_size)]
        dist.all_gather(parts, x.contiguous())
    if sizes and min(sizes) < most:
        parts = [p.narrow(dim, 0, n) for p, n in zip(parts, sizes, strict=True)]
    return torch.cat(parts, dim=dim)


def all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """Rows [sum(send_counts[:j]), +send_counts[j]) of x go to rank j; the rows from each rank
    come back in rank order. Gloo (torch 2.13) and NCCL both run all_to_all_single, uneven
    splits included."""
    out = x.new_empty(sum(recv_counts), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts)
    return out


def exchange_counts(send_counts: torch.Tensor) -> list[int]:
    """Each rank tells every other how many rows it will send it: (world,) -> (world,)."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts)
    return recv.tolist()


def gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (once, at start-up: not for the hot path)."""
    out: list[Any] = [None] * _world_size
    dist.all_gather_object(out, obj)
    return out


# -- the step --


def broadcast_step(step: Any) -> None:
    """Rank 0: send the step's inputs (a picklable object; None ends the workers' loop)."""
    if _shm is not None:
        _shm.broadcast(step)
        return
    dist.broadcast_object_list([step], src=0)


def receive_step() -> Any:
    """Ranks > 0: the step rank 0 broadcast."""
    if _shm is not None:
        return _shm.broadcast()
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
