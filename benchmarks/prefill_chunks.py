"""What chunked prefill costs: prefill tokens/s of one long prompt by prefill chunk size.

Under contention the scheduler prefills a long prompt in chunks of `--long-prefill-tokens`
(thrifty/engine/scheduler.py); this times one ~1,900-token prompt (no prefix cache) computed in
chunks of each size, best of `--rounds`.

    .venv/bin/python benchmarks/prefill_chunks.py [--chunks 2048 512 256 128]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from thrifty import SamplingParams, hub
from thrifty.config import EngineConfig
from thrifty.engine.llm_engine import LLMEngine

WORDS = ["river", "stone", "cloud", "market", "engine", "violet", "thunder", "paper"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--chunks", type=int, nargs="+", default=[2048, 512, 256, 128])
    p.add_argument("--tokens", type=int, default=1900)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = hub.resolve(args.model, progress=False)
    rng = random.Random(0)
    print(f"{args.model}, {args.tokens}-token prompt, {args.threads} threads")
    print("| chunk | prefill tok/s |\n|---|---|")
    for chunk in args.chunks:
        # max_num_batched_tokens = the chunk: the prompt is computed `chunk` tokens a step
        config = EngineConfig(max_num_batched_tokens=chunk, enable_prefix_caching=False,
                              max_model_len=4096)  # fmt: skip
        engine = LLMEngine(path, config)
        best = float("inf")
        for _ in range(args.rounds):
            text = " ".join(rng.choice(WORDS) for _ in range(args.tokens))
            ids = engine.tokenizer.encode(text)[: args.tokens]
            start = time.perf_counter()
            rid = engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0))
            while engine.has_unfinished():
                engine.step()
            best = min(best, time.perf_counter() - start)
            engine.pop_finished(rid)
        print(f"| {chunk} | {len(ids) / best:.0f} |", flush=True)


if __name__ == "__main__":
    main()
