"""Paged decode attention (csrc/cpu_ops.cpp) at one query token: microseconds per call.

SmolLM2's shape (9 query heads over 3 KV heads of 64 dims), one sequence, its keys and values in
blocks of 16 read through the block table, float32 and bf16, 1 and 2 threads; the compiled path
is the CPU's (AVX-512, AVX2, or the scalar loop):

    .venv/bin/python benchmarks/decode_attention.py
"""

from __future__ import annotations

import os
import time

import torch

from thrifty import kernels

H, HKV, D, BLOCK = 9, 3, 64, 16


def main() -> None:
    print(f"threads up to 2, load average {os.getloadavg()[0]:.1f}")
    print("| dtype | context | threads | us per call |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for length in (64, 200, 1000, 2000):
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
