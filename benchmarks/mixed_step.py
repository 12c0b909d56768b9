"""One layer's attention in a continuous-batching step that mixes decoding sequences with a
prompt chunk: split in two parts (the engine's way) against one padded batch (every decoding
sequence padded to the chunk's length, as before). Qwen2.5-0.5B's attention shape (14 query
heads, 2 KV heads of 64), bf16, a paged cache of 16-token blocks. Median over rounds.

    python benchmarks/mixed_step.py     # 127 decoding (400-token contexts), a 200-token chunk
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from thrifty.models.attention import build_metadata, forward_context, paged_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 14, 2, 64, 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decoding", type=int, default=127, help="sequences decoding one token")
    p.add_argument("--context", type=int, default=400, help="their context length")
    p.add_argument("--chunk", type=int, default=200, help="the prompt chunk's length")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    query_lens = [1] * args.decoding + [args.chunk]
    context_lens = [args.context] * args.decoding + [args.chunk]
    per_seq = -(-max(context_lens) // BLOCK)
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(len(query_lens))]
    g = torch.Generator().manual_seed(0)
    shape = (1 + len(query_lens) * per_seq, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=g).bfloat16()
    v_cache = torch.randn(shape, generator=g).bfloat16()
    n = sum(query_lens)
    q = torch.randn(n, HEADS, HEAD_DIM, generator=g).bfloat16()
    k = torch.randn(n, KV_HEADS, HEAD_DIM, generator=g).bfloat16()
    v = torch.randn(n, KV_HEADS, HEAD_DIM, generator=g).bfloat16()
    split = build_metadata(query_lens, context_lens, tables, BLOCK)
    padded = build_metadata(query_lens, context_lens, tables, BLOCK, split=False)
    print(
        f"{args.decoding} sequences decoding ({args.context}-token contexts) + a "
        f"{args.chunk}-token chunk, {args.threads} threads, median of {args.rounds}"
    )
    print("| attention | ms per layer |\n|---|---|")
    for name, meta in (("split in two parts", split), ("one padded batch", padded)):
        times = []
        with torch.inference_mode(), forward_context(meta):
            paged_attention(q, k, v, k_cache, v_cache, HEAD_DIM**-0.5)  # warm-up
            for _ in range(args.rounds):
                start = time.perf_counter()
                paged_attention(q, k, v, k_cache, v_cache, HEAD_DIM**-0.5)
                times.append(time.perf_counter() - start)
        print(f"| {name} | {1e3 * statistics.median(times):.1f} |")


if __name__ == "__main__":
    main()
