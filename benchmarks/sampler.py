"""One sampling step of a large batch: the torch paths (a full sort; a partial top-k of 1024
candidates) against the compiled sampler (csrc/sampling.cpp), without and with the top-5
logprobs that `thrifty eval` records for DeepConf. Logits are random with a peaked head (as a
model's are), each row with its own seed, as `thrifty eval` and the server's seeded requests
run. Median over rounds.

    python benchmarks/sampler.py                    # batch 16/64/128, Qwen's and SmolLM2's vocab
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from thrifty import kernels
from thrifty.engine.sampler import Sampler
from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.sequence import Sequence

VOCABS = {"qwen2.5": 151936, "smollm2": 49152}


class _NoText:
    def step(self, all_ids: list[int]) -> str:
        return ""


def seqs(batch: int, **params) -> list[Sequence]:
    return [
        Sequence("r", i, [0], SamplingParams(seed=i, **params), _NoText(), max_model_len=64)
        for i in range(batch)
    ]


def time_step(sampler: Sampler, logits: torch.Tensor, rows: list[Sequence], rounds: int) -> float:
    sampler(logits.clone(), rows)  # warm-up
    times = []
    for _ in range(rounds):
        x = logits.clone()
        start = time.perf_counter()
        sampler(x, rows)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.sampling_available():
        raise SystemExit("error: the compiled sampler did not build here")
    print(f"threads {args.threads}, temperature 0.7, top-p 0.95, a seed per row")
    print("| vocab | batch | logprobs | sort ms | candidates ms | compiled ms | vs candidates |")
    print("|---|---|---|---|---|---|---|")
    for name, vocab in VOCABS.items():
        for batch in args.batches:
            g = torch.Generator().manual_seed(batch)
            logits = torch.randn(batch, vocab, generator=g) * 2
            logits[:, torch.randperm(vocab, generator=g)[:50]] += 12
            for logprobs in (None, 5):
                rows = seqs(batch, temperature=0.7, top_p=0.95, logprobs=logprobs)
                full = time_step(
                    Sampler(candidates=vocab, compiled=False), logits, rows, args.rounds
                )
                fast = time_step(Sampler(compiled=False), logits, rows, args.rounds)
                compiled = time_step(Sampler(), logits, rows, args.rounds)
                print(
                    f"| {name} {vocab} | {batch} | {logprobs or '-'} | {1e3 * full:.0f} |"
                    f" {1e3 * fast:.0f} | {1e3 * compiled:.1f} | {fast / compiled:.0f}x |"
                )


if __name__ == "__main__":
    main()
