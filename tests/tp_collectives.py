"""The collectives of thrifty.distributed on 2 ranks, held to gloo's own, as JSON on stdout.

Run as a script by tests/test_tensor_parallel.py (the process group lives and dies with it):
    python tests/tp_collectives.py CAPACITY_BYTES
Rank 0 spawns rank 1; each checks its results and rank 0 prints what it saw. CAPACITY_BYTES
shrinks the shared-memory slots so that the tensors below take several rounds; with
THRIFTY_SHM_COLLECTIVES=0 everything goes through gloo. At the end rank 1 exits while rank 0
waits for it in an all-reduce: rank 0 must raise, not hang.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

from thrifty import distributed


def checks(rank: int) -> dict:
    torch.manual_seed(rank)
    out: dict = {"transport": distributed.transport()}
    cases = ((torch.float32, (3, 5)), (torch.bfloat16, (7, 1000)), (torch.float32, (5000,)))
    for dtype, shape in cases:
        x = torch.randn(shape).to(dtype)
        want = x.clone()
        dist.all_reduce(want)
        got = distributed.all_reduce(x.clone())
        out[f"all_reduce {dtype} {shape}"] = torch.equal(got, want)
    mine, other = (torch.randn(40, 30, generator=torch.Generator().manual_seed(10 + r))
                   for r in (rank, 1 - rank))  # fmt: skip
    t = mine.clone().t()  # not contiguous: reduced in place all the same
    distributed.all_reduce(t)
    out["all_reduce of a transposed view"] = torch.equal(t, (mine + other).t())
    # Uneven widths, as the vocabulary's shards are: rank 0 has 7 columns, rank 1 has 5.
    widths = [7, 5]
    part = torch.arange(3 * widths[rank], dtype=torch.float32).view(3, -1) + 100 * rank
    full = distributed.all_gather(part, dim=-1, sizes=widths)
    want = torch.cat([torch.arange(3 * w, dtype=torch.float32).view(3, -1) + 100 * r
                      for r, w in enumerate(widths)], dim=-1)  # fmt: skip
    out["all_gather uneven"] = torch.equal(full, want)
    big = {"ids": list(range(20_000)), "text": "step " * 1000}
    for name, obj in (("small", ("fwd", [1, 2, 3])), ("big", big), ("none", None)):
        if rank == 0:
            distributed.broadcast_step(obj)
            got = obj
        else:
            got = distributed.receive_step()
        out[f"broadcast {name}"] = got == obj
    out["segment unlinked"] = not any(
        f.startswith(f"thrifty-tp-{os.getpid() if rank == 0 else os.getppid()}-")
        for f in os.listdir("/dev/shm")
    ) if os.path.isdir("/dev/shm") else True  # fmt: skip
    return out


def rank1(init: str, capacity: int) -> None:
    distributed.CAPACITY = capacity
    distributed.init(1, 2, init, "cpu")
    result = checks(1)
    assert all(v for k, v in result.items() if k != "transport"), result
    os._exit(0)  # gone before rank 0's last all-reduce


def main() -> None:
    capacity = int(sys.argv[1])
    distributed.CAPACITY = capacity
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    child = multiprocessing.get_context("spawn").Process(target=rank1, args=(init, capacity))
    child.start()
    distributed.init(0, 2, init, "cpu")
    result = checks(0)
    child.join(timeout=60)
    start = time.monotonic()
    try:
        distributed.all_reduce(torch.ones(4))
        result["a dead peer"] = "no error"
    except RuntimeError as e:
        result["a dead peer"] = str(e).splitlines()[0]
    result["seconds to notice"] = round(time.monotonic() - start, 1)
    print(json.dumps(result))
    os._exit(0)  # the group's peer is gone: nothing to tear down


if __name__ == "__main__":
    main()
