"""Paged decode attention (csrc/cpu_ops.cpp) at one query token: microseconds per call.

SmolLM2's shape (9 query heads over 3 KV heads of 64 dims; `--heads 14 --kv-heads 2`:
Qwen2.5-0.5B's), one sequence, its keys and values in blocks of 16 read through the block
table, float32 and bf16, 1 and 2 threads; the compiled path is the CPU's (AVX-512, AVX2, or the
scalar loop):

    .venv/bin/python benchmarks/decode_attention.py [--heads 14 --kv-heads 2] [--lengths 1000,4000]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from thrifty import kernels

D, BLOCK = 64, 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--lengths", default="64,200,1000,2000")
    args = p.parse_args()
    H, HKV = args.heads, args.kv_heads  # noqa: N806
    print(f"{H} query heads over {HKV} KV heads of {D} dims, threads up to 2, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| dtype | context | threads | us per call |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for length in map(int, args.lengths.split(",")):
            blocks = length // BLOCK + 2
            k_cache = torch.randn(blocks + 1, BLOCK, HKV, D).to(dtype)
            v_cache = torch.randn_like(k_cache)
            q = torch.randn(1, H, D).to(dtype)
            tables, lens = torch.arange(1, blocks + 1).view(1, -1), torch.tensor([length])

            def call(q=q, k_cache=k_cache, v_cache=v_cache, tables=tables, lens=lens):
                return kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, D**-0.5)

            for threads in (1, 2):
                torch.set_num_threads(threads)
                for _ in range(50):
                    call()
                start = time.perf_counter()
                for _ in range(2000):
                    call()
                us = (time.perf_counter() - start) / 2000 * 1e6
                name = str(dtype).split(".")[1]
                print(f"| {name} | {length} | {threads} | {us:.1f} |", flush=True)


if __name__ == "__main__":
    main()
