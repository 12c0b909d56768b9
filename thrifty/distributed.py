"""The process group of tensor and expert parallelism: rank, world size, collectives, the step.

One group spans every rank: attention heads, MLP columns and the vocabulary are split across all
of them (tensor parallel) and so are a MoE layer's experts (expert parallel, EP = TP). Rank 0 runs
the scheduler and samples; each step it broadcasts the batch (`broadcast_step`) and every rank
runs the same forward on its shards. Gloo on the CPU, NCCL on CUDA.

With one process (the default) the group is never made: layers are built whole and nothing here
runs on the hot path.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from thrifty.errors import ThriftyError

_rank = 0
_world_size = 1


def rank() -> int:
    return _rank


def world_size() -> int:
    return _world_size


def init(rank: int, world_size: int, init_method: str, device: str) -> str:
    """Join the group as `rank`; returns this rank's device (cuda:<rank> for a CUDA device)."""
    global _rank, _world_size
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
    return device


def close() -> None:
    global _rank, _world_size
    if dist.is_initialized():
        dist.destroy_process_group()
    _rank, _world_size = 0, 1


@dataclass(frozen=True)
class Shard:
    """How a weight splits across the ranks: along `dim`, each of its merged `parts` (q, k, v, or
    gate, up; one part when not merged) on its own. `replicas[i]` ranks share one slice of part i:
    KV heads fewer than the ranks are replicated, each rank keeping the head its queries read."""

    dim: int
    parts: tuple[int, ...]
    replicas: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for i, part in enumerate(self.parts):
            copies = self.replicas[i] if self.replicas else 1
            if part * copies % _world_size:
                raise ThriftyError(
                    f"tensor parallelism over {_world_size} ranks cannot split a weight of "
                    f"{part} {'rows' if self.dim == 0 else 'columns'} evenly"
                )

    def size(self, part: int = 0) -> int:
        """This rank's slice of part `part` along `dim`."""
        copies = self.replicas[part] if self.replicas else 1
        return self.parts[part] * copies // _world_size

    def start(self, part: int = 0) -> int:
        copies = self.replicas[part] if self.replicas else 1
        return _rank // copies * self.size(part)

    @property
    def local(self) -> int:
        return sum(self.size(i) for i in range(len(self.parts)))


def split(total: int, what: str) -> int:
    """total / world size, refused unless it divides evenly (heads, experts, vocab, columns)."""
    if total % _world_size:
        raise ThriftyError(
            f"tensor parallelism over {_world_size} ranks needs {what} divisible by "
            f"{_world_size}; this model has {total}"
        )
    return total // _world_size


def kv_head_replicas(num_kv_heads: int) -> int:
    """Ranks sharing each KV head: 1 when the KV heads split, world / KV heads when fewer."""
    if num_kv_heads >= _world_size:
        split(num_kv_heads, "KV heads")
        return 1
    if _world_size % num_kv_heads:
        raise ThriftyError(
            f"{num_kv_heads} KV heads cannot be replicated evenly over {_world_size} ranks"
        )
    return _world_size // num_kv_heads


# -- collectives (called only when world_size() > 1) --


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the ranks, in place: the one reduction of row-parallel layers."""
    dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Every rank's x (equal shapes), concatenated along `dim` in rank order."""
    parts = [torch.empty_like(x) for _ in range(_world_size)]
    dist.all_gather(parts, x.contiguous())
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


# -- the step --


def broadcast_step(step: Any) -> None:
    """Rank 0: send the step's inputs (a picklable object; None ends the workers' loop)."""
    dist.broadcast_object_list([step], src=0)


def receive_step() -> Any:
    """Ranks > 0: the step rank 0 broadcast."""
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
