"""The ranks of a tensor-parallel engine: started here, or joined under torchrun.

Rank 0 is the engine the caller holds (scheduler, sampler, server). Every other rank builds the
same engine on its shards and follows: it runs each step rank 0 broadcasts (ModelRunner.follow).

- `thrifty serve --tensor-parallel-size N` (or LLM(..., tensor_parallel_size=N)) spawns ranks
  1..N-1 on this machine. They die with rank 0 (PR_SET_PDEATHSIG), so Ctrl-C, SIGTERM or a
  crash of rank 0 leaves no orphans; a rank that dies makes rank 0 exit with a one-line error,
  rather than wait forever in a collective.
- Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set) each process joins by
  those; `thrifty serve` on a rank > 0 follows instead of serving.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from thrifty import distributed
from thrifty.config import EngineConfig
from thrifty.errors import ThriftyError


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_follower() -> bool:
    """A rank > 0 under torchrun: it follows rank 0's steps instead of serving."""
    return under_torchrun() and int(os.environ["RANK"]) > 0


class Ranks:
    """Ranks 1..N-1 spawned by rank 0, watched until rank 0 closes them."""

    def __init__(self, path: Path, config: EngineConfig, allow_pickle: bool):
        n = config.tensor_parallel_size
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = multiprocessing.get_context("spawn")  # fork after torch has threads is unsafe
        self.procs = [
            ctx.Process(
                target=_follow_spawned,
                args=(r, n, init_method, path, config, allow_pickle),
                name=f"thrifty-rank-{r}",
                daemon=True,
            )
            for r in range(1, n)
        ]
        for p in self.procs:
            p.start()
        self.closing = False
        atexit.register(self.close)
        threading.Thread(target=self._watch, name="thrifty-ranks", daemon=True).start()
        self.init_method = init_method

    def _watch(self) -> None:
        by_sentinel = {p.sentinel: r for r, p in enumerate(self.procs, start=1)}
        ready = multiprocessing.connection.wait(list(by_sentinel))
        if self.closing:
            return
        rank = by_sentinel[ready[0]]  # type: ignore[index]
        code = self.procs[rank - 1].exitcode
        print(
            f"error: tensor-parallel rank {rank} exited (code {code}); stopping all ranks",
            file=sys.stderr,
            flush=True,
        )
        self.close()
        os._exit(1)

    def close(self) -> None:
        """End the other ranks (they hold no state worth a clean exit)."""
        self.closing = True
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=10)


def join(path: Path, config: EngineConfig, allow_pickle: bool) -> tuple[EngineConfig, Ranks | None]:
    """Make the process group for `config.tensor_parallel_size` ranks, as rank 0 or as the rank
    torchrun says; returns the config with this rank's device, and the ranks spawned here."""
    n = config.tensor_parallel_size
    if distributed.world_size() == n:  # a follower spawned by rank 0, already in the group
        return config, None
    if distributed.world_size() != 1:
        raise ThriftyError(f"already in a group of {distributed.world_size()} ranks, not {n}")
    ranks = None
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world != n:
            raise ThriftyError(f"torchrun started {world} processes; --tensor-parallel-size is {n}")
        rank, init_method = int(os.environ["RANK"]), "env://"
    else:
        ranks = Ranks(path, config, allow_pickle)
        rank, init_method = 0, ranks.init_method
    device = distributed.init(rank, n, init_method, config.device)
    return dataclasses.replace(config, device=device), ranks


def follow(path: Path, config: EngineConfig, allow_pickle: bool) -> None:
    """Build this rank's shard of the engine and run rank 0's steps until it stops."""
    from thrifty.engine.llm_engine import LLMEngine

    engine = LLMEngine(path, config, allow_pickle=allow_pickle)
    try:
        engine.runner.follow()
    except RuntimeError as e:  # a collective whose peer went away: rank 0 stopped
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ThriftyError(f"rank {distributed.rank()} lost rank 0: {why}") from None


def _follow_spawned(
    rank: int, n: int, init_method: str, path: Path, config: EngineConfig, allow_pickle: bool
) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle
    try:
        device = distributed.init(rank, n, init_method, config.device)
        follow(path, dataclasses.replace(config, device=device), allow_pickle)
    except ThriftyError as e:
        print(f"error: rank {rank}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent (rank 0) exits, however it exits."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        sys.exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
