"""A bfloat16 KV cache against the activations' float32 one: decode speed and capacity.

One process, two engines on the same model (a GGUF model on a CPU without AVX-512 BF16 runs in
float32), one with `kv_cache_dtype="bfloat16"`; they take turns decoding the same batches, each
sequence a prompt of about `--context` tokens followed by `--tokens` greedy tokens, and the
median of each round's ratio is reported beside each engine's median tok/s. Also: bytes of
cache a token and the tokens that fit in 1 GiB, and whether the greedy tokens agree.

    .venv/bin/python benchmarks/kv_cache_dtype.py [--model NAME] [--batch 1,32] [--context 64,512]

`--perplexity WIKI` (gensim's enwiki sample, see perplexity.py) instead scores `--ppl-tokens`
tokens of it, each by a decode step over the cache, with either cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from thrifty import LLM, SamplingParams

WORDS = "The quick brown fox jumps over the lazy dog while the river runs to the sea. "


def prompt_ids(llm: LLM, i: int, context: int) -> list[int]:
    """About `context` tokens: a numbered task, then filler text cut to length."""
    head = llm.tokenizer.encode(f"Task {i}: summarise the following text. ")
    filler = llm.tokenizer.encode(WORDS * (context // 8 + 1))
    return (head + filler)[:context]


def decode_rate(llm: LLM, batch: int, context: int, tokens: int) -> tuple[float, list]:
    """Tokens a second over the steps after every sequence has its first token (prefill and
    the first token excluded), and each sequence's tokens."""
    engine = llm.engine
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    ids = [engine.add_request(prompt_ids(llm, i, context), params) for i in range(batch)]
    out: dict[str, list[int]] = {i: [] for i in ids}
    elapsed = decoded = 0
    while engine.has_unfinished():
        decoding = all(out[i] for i in ids)
        t0 = time.perf_counter()
        steps = engine.step()
        dt = time.perf_counter() - t0
        new = 0
        for s in steps:
            out[s.request_id] += s.token_ids
            new += len(s.token_ids)
        if decoding:
            elapsed += dt
            decoded += new
    return decoded / max(elapsed, 1e-9), [out[i] for i in ids]


def perplexities(args: argparse.Namespace) -> None:
    from gguf_native import teacher_forced_perplexity
    from perplexity import wiki_text

    from thrifty import hub
    from thrifty.config import ModelConfig
    from thrifty.loader.weights import load_model
    from thrifty.tokenizer import Tokenizer

    path = hub.resolve(args.model, progress=False)
    text = wiki_text(args.perplexity, 40 * args.ppl_tokens)
    ids = torch.tensor(Tokenizer.from_dir(path, ()).encode(text, add_special_tokens=False))
    ids = ids[: args.ppl_tokens]
    cfg = ModelConfig.from_dir(path)
    model = load_model(path, cfg, dtype=torch.float32)
    print(f"{args.model}: {len(ids)} tokens of Wikipedia, one decode step each")
    print("| KV cache | perplexity |")
    print("|---|---|")
    for kv in (torch.float32, torch.bfloat16):
        ppl = teacher_forced_perplexity(model, cfg, ids, kv_cache_dtype=kv)
        print(f"| {str(kv).removeprefix('torch.')} | {ppl:.4f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--context", default="64,512", help="comma-separated prompt lengths")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--perplexity", metavar="WIKI", help="gensim's enwiki *-shortened.bz2")
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.perplexity:
        perplexities(args)
        return
    engines = {  # float32 activations, as `--dtype auto` has them on a CPU without AVX-512 BF16
        kv: LLM(
            args.model,
            dtype="float32",
            kv_cache_memory_bytes=1 << 30,
            kv_cache_dtype=kv,
            progress=False,
        )
        for kv in ("float32", "bfloat16")
    }
    print(f"{args.model}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    for kv, llm in engines.items():
        runner, config = llm.engine.runner, llm.engine.config
        per_token = runner.kv_cache.nbytes // (runner.num_blocks * config.block_size)
        print(
            f"- cache {str(runner.kv_cache.dtype).removeprefix('torch.')} ({kv}): "
            f"{per_token} bytes a token, {runner.num_blocks * config.block_size} tokens in 1 GiB"
        )
    print(
        "\n| batch | context | float32 cache tok/s | bfloat16 cache tok/s | ratio | same tokens |"
    )
    print("|---|---|---|---|---|---|")
    for batch in map(int, args.batch.split(",")):
        for context in map(int, args.context.split(",")):
            rates: dict[str, list[float]] = {kv: [] for kv in engines}
            tokens: dict[str, list] = {}
            for r in range(args.rounds):
                order = list(engines) if r % 2 == 0 else list(engines)[::-1]
                for kv in order:
                    rate, out = decode_rate(engines[kv], batch, context, args.tokens)
                    rates[kv].append(rate)
                    tokens[kv] = out
            ratio = statistics.median(
                b / a for a, b in zip(rates["float32"], rates["bfloat16"], strict=True)
            )
            same = sum(a == b for a, b in zip(tokens["float32"], tokens["bfloat16"], strict=True))
            print(
                f"| {batch} | {context} | {statistics.median(rates['float32']):.1f} "
                f"| {statistics.median(rates['bfloat16']):.1f} | {ratio:.2f} | {same}/{batch} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
