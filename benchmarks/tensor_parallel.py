"""Tensor parallelism on this machine: 1 rank vs 2 ranks (one thread each), prefill and decode.

The model is the real SmolLM2-135M-Instruct GGUF (9 query heads and 3 KV heads, split 6+3 and
2+1 over 2 ranks; its Q4_1 weights stay quantized, each rank holding its own rows or columns),
with --dtype auto's activations. Each setting runs in its own process (the ranks' process group
lives and dies with it): 1 rank x 1 thread, 1 rank x 2 threads (the same two cores as two
ranks) and 2 ranks x 1 thread, the 2 ranks' collectives through shared memory (the default on
one host) or through gloo (THRIFTY_SHM_COLLECTIVES=0), and the settings take turns for --rounds
rounds (medians reported). Prefill: one prompt of --prompt tokens, no prefix cache, best of 3.
Decode: --batch sequences of 32-token prompts, --tokens greedy tokens each, after the first.
Then DeepSeek-V3's communication per token at TP=8 / EP=64, on paper.

    .venv/bin/python benchmarks/tensor_parallel.py [--model smollm2-135m-instruct] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# (ranks, threads per rank, collectives over gloo rather than shared memory)
SETTINGS = [(1, 1, False), (1, 2, False), (2, 1, False), (2, 1, True)]


def measure(path: str, ranks: int, threads: int, prompt: int, tokens: int, batches: list[int]):
    from thrifty import SamplingParams, distributed, hub
    from thrifty.config import EngineConfig, resolve_dtype
    from thrifty.engine.llm_engine import LLMEngine

    model_dir = hub.resolve(path, progress=False)
    config = EngineConfig(
        tensor_parallel_size=ranks, num_threads=threads, enable_prefix_caching=False,
        max_model_len=2048, kv_cache_memory_bytes=256 << 20,
        dtype=resolve_dtype("auto", model_dir, "cpu"),  # as `thrifty serve` picks it
    )  # fmt: skip
    engine = LLMEngine(model_dir, config)
    greedy = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def run(prompts: list[list[int]], params: SamplingParams) -> tuple[float, float]:
        """(seconds to the first token of every prompt, seconds after that to the end)."""
        for ids in prompts:
            engine.add_request(ids, params)
        start = time.perf_counter()
        first = None
        while engine.has_unfinished():
            engine.step()
            if first is None and all(r.first_token_time for r in engine.requests.values()):
                first = time.perf_counter()
        end = time.perf_counter()
        for rid in list(engine.requests):
            engine.pop_finished(rid)
        return first - start, end - first  # type: ignore[operator]

    ids = [(i * 7919) % 49000 + 100 for i in range(prompt)]
    run([ids[:64]], greedy)  # warm up
    result: dict = {"prefill": prompt / min(run([ids], greedy)[0] for _ in range(3))}
    decode = SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True)
    for b in batches:
        prompts = [[(t * 31 + s * 977) % 49000 + 100 for t in range(32)] for s in range(b)]
        result[f"decode{b}"] = b * tokens / run(prompts, decode)[1]
    result["transport"] = distributed.transport() if ranks > 1 else "-"
    return result


def deepseek_v3_on_paper() -> str:
    """Bytes each rank sends per token, by collective, for DeepSeek-V3 at TP=8 / EP=64."""
    hidden, layers, dense_layers, vocab, k = 7168, 61, 3, 129280, 8
    tp, ep, bf16, fp8 = 8, 64, 2, 1
    moe_layers = layers - dense_layers
    # Each token goes to its k experts; with 64 ranks nearly all of them are remote.
    sent = k * (ep - 1) / ep * hidden
    ring = 2 * (tp - 1) / tp  # a ring all-reduce sends 2 (n - 1) / n of the tensor per rank
    rows = [
        ("embedding all-reduce (TP=8)", 1, ring * hidden * bf16),
        ("attention o_proj all-reduce (TP=8)", layers, ring * hidden * bf16),
        ("dense MLP all-reduce (TP=8)", dense_layers, ring * hidden * bf16),
        ("shared expert all-reduce (TP=8)", moe_layers, ring * hidden * bf16),
        ("MoE dispatch all-to-all (EP=64, FP8)", moe_layers, sent * fp8),
        ("MoE combine all-to-all (EP=64, bf16)", moe_layers, sent * bf16),
        ("logits all-gather (TP=8, bf16)", 1, (tp - 1) / tp * vocab * bf16),
    ]  # fmt: skip
    lines = ["| collective | per layer (KiB) | layers | per token (KiB) |", "|---|---|---|---|"]
    total = 0.0
    for name, n, per in rows:
        total += n * per
        lines.append(f"| {name} | {per / 1024:.1f} | {n} | {n * per / 1024:.0f} |")
    lines.append(f"| **total** | | | **{total / 1024:.0f}** |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--measure", nargs=3, metavar=("MODEL", "RANKS", "THREADS"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.measure:  # one setting, in its own process
        model, ranks, threads = args.measure[0], int(args.measure[1]), int(args.measure[2])
        print(json.dumps(measure(model, ranks, threads, args.prompt, args.tokens, args.batch)))
        return
    runs: dict[tuple[int, int, bool], list[dict]] = {s: [] for s in SETTINGS}
    loads = []
    for _ in range(args.rounds):
        for ranks, threads, gloo in SETTINGS:
            cmd = [sys.executable, __file__, "--prompt", str(args.prompt), "--tokens",
                   str(args.tokens), "--batch", *map(str, args.batch),
                   "--measure", args.model, str(ranks), str(threads)]  # fmt: skip
            env = {**os.environ, "THRIFTY_SHM_COLLECTIVES": "0" if gloo else "1"}
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if out.returncode:
                sys.exit(f"{ranks} rank(s): {out.stderr[-2000:]}")
            runs[ranks, threads, gloo].append(json.loads(out.stdout.splitlines()[-1]))
            loads.append(os.getloadavg()[0])
    print(
        f"{args.model}, medians of {args.rounds} rounds, load average"
        f" {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} cores"
    )
    head = " | ".join(f"decode batch {b} (tok/s)" for b in args.batch)
    print(f"| ranks x threads | collectives | prefill {args.prompt} tok (tok/s) | {head} |")
    print("|---|---|---|" + "---|" * len(args.batch))
    for (ranks, threads, _), rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "transport"}
        cells = " | ".join(f"{med[f'decode{b}']:.1f}" for b in args.batch)
        print(f"| {ranks} x {threads} | {rs[0]['transport']} | {med['prefill']:.0f} | {cells} |")
    print("\nDeepSeek-V3 at TP=8 / EP=64, bytes each rank sends per token (on paper):\n")
    print(deepseek_v3_on_paper())


if __name__ == "__main__":
    main()
