"""Self-consistency's cost model: N samples of one prompt in one continuous batch, sharing the
prompt's KV blocks, against N generations one after another.

Prints and writes benchmarks/results/tts_sharing.{json,md}: wall time, prompt tokens actually
prefilled (the runner's counter) and decode throughput for
  - batched: one request with n=N (siblings take the prompt's blocks from the prefix cache),
  - sequential: N requests with n=1, one after another,
  - batched without prefix caching: what the counter shows when nothing is shared.
Every sample generates exactly --max-tokens tokens (ignore_eos), so the work is equal.

    .venv/bin/python benchmarks/tts_sharing.py [--model smollm2-135m-instruct] [--n 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

from thrifty import LLM, SamplingParams

QUESTION = (
    "A bakery sells muffins for 3 dollars and cookies for 2 dollars. On Monday it sold 14 "
    "muffins and 23 cookies; on Tuesday twice as many muffins and 5 fewer cookies. How much "
    "money did it take in over the two days? Think step by step, then end with: The answer is N."
)


def run(llm: LLM, prompt: list[int], params: SamplingParams, requests: int) -> dict:
    engine = llm.engine
    prefill, hits = engine.runner.num_prefill_tokens, engine.blocks.prefix_hits
    start = time.perf_counter()
    tokens = 0
    for i in range(requests):  # one at a time when requests > 1
        out = llm.generate([prompt], dataclasses.replace(params, seed=i))
        tokens += sum(len(o.token_ids) for o in out[0].outputs)
    wall = time.perf_counter() - start
    return {
        "wall_s": round(wall, 3),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "prompt_tokens_prefilled": engine.runner.num_prefill_tokens - prefill,
        "prompt_tokens_from_prefix_cache": engine.blocks.prefix_hits - hits,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tts_sharing"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    llm = LLM(args.model, progress=False)
    prompt = llm._chat_ids([{"role": "user", "content": QUESTION}])
    # Warm up kernels (built on first use) at batch 1 and at batch n.
    llm.generate([prompt[:8]], SamplingParams(max_tokens=4, n=args.n))
    one = SamplingParams(max_tokens=args.max_tokens, temperature=0.7, ignore_eos=True)
    many = dataclasses.replace(one, n=args.n)
    rows = {}
    # A fresh engine per measurement, so no run finds another's prompt in the prefix cache.
    rows["batched"] = run(llm, prompt, many, 1)
    llm = LLM(args.model, progress=False)
    rows["sequential"] = run(llm, prompt, one, args.n)
    llm = LLM(args.model, progress=False, enable_prefix_caching=False)
    rows["batched_no_prefix_cache"] = run(llm, prompt, many, 1)

    speedup = rows["sequential"]["wall_s"] / rows["batched"]["wall_s"]
    result = {
        "model": args.model,
        "n": args.n,
        "prompt_tokens": len(prompt),
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "load_average_at_end": os.getloadavg(),
        "speedup_batched_vs_sequential": round(speedup, 2),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"{args.model}: {args.n} samples of one {len(prompt)}-token prompt, "
        f"{args.max_tokens} tokens each, {args.threads} threads, "
        f"load average at the end {os.getloadavg()[0]:.1f}",
        "",
        "| run | wall s | tokens/s | prompt tokens prefilled | from prefix cache |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['wall_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['prompt_tokens_prefilled']} | {r['prompt_tokens_from_prefix_cache']} |"
        )
    lines.append(f"\nbatched is {speedup:.1f}x faster than sequential")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
