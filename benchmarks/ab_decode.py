"""Decode of one model from two source trees, taking turns: did a change slow it down?

On a shared machine whose speed swings by 1.4x within minutes, two runs minutes apart say
little; runs that alternate, each in a fresh process, see the same swings. Make the other tree
with `git worktree add /tmp/wt REV` (its kernels compile into their own cache on first use).
`--batch B` decodes B sequences at once (their prompts differ in one word) and reports their
tokens together.

    python benchmarks/ab_decode.py /tmp/wt . --pairs 8 [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a Python function that checks whether a number is prime, with a docstring."


def child(model: str, tokens: int, threads: int, batch: int) -> float:
    import torch

    from thrifty import LLM, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(model, progress=False, kv_cache_memory_bytes=64 << 20)
    llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0))  # warm-up
    engine = llm.engine
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(PROMPT.replace("prime", f"prime (case {i})"), params)
    times = []
    while engine.has_unfinished():
        engine.step()
        times.append(time.perf_counter())
    return batch * (len(times) - 1) / (times[-1] - times[0])


def run(tree: Path, args: argparse.Namespace) -> float:
    script = str(Path(__file__).resolve())
    cmd = [sys.executable, script, "--child", args.model, str(args.tokens), str(args.threads),
           str(args.batch)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    out = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trees", nargs="*", type=Path, metavar="TREE", help="source trees A and B")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        model, tokens, threads, batch = args.child
        print(json.dumps(child(model, int(tokens), int(threads), int(batch))))
        return
    if len(args.trees) != 2:
        ap.error("give two source trees, A and B")
    a, b = args.trees
    runs: dict[Path, list[float]] = {a: [], b: []}
    for i in range(args.pairs):
        order = (a, b) if i % 2 == 0 else (b, a)  # each tree goes first half the time
        for tree in order:
            runs[tree].append(run(tree, args))
        print(f"pair {i + 1}: A {runs[a][-1]:.1f}  B {runs[b][-1]:.1f} tok/s", flush=True)
    for name, tree in (("A", a), ("B", b)):
        r = runs[tree]
        print(f"{name} {tree}: median {statistics.median(r):.1f} tok/s ({min(r):.1f}-{max(r):.1f})")
    ratios = [y / x for x, y in zip(runs[a], runs[b], strict=True)]
    print(f"B / A, median of pairs: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
