"""GGUF models run natively (weights quantized as in the file) against the old bf16 path.

Decode (default): batch-1 decode tokens/s of SmolLM2-135M (Q4_1, Q8_0 embedding and tied head)
and Qwen2.5-Coder-0.5B (Q5_0 / Q8_0 / Q4_K / Q6_K), each variant in its own process (so load
time and resident memory are its own), rounds interleaved (each round starting with the next
variant), medians over rounds:
- native: the GGUF's weights repacked at load and run by csrc/ggml_gemv.cpp;
- bf16: the same model with every quantized weight dequantized to bf16 and packed, as thrifty
  ran GGUF models before (from a float32 safetensors copy);
- llama.cpp: with `--llama-cpp-python PYTHON` (an interpreter with llama_cpp), the same file.
Tok/s: tokens after the first / the time after the first token (greedy, EOS ignored). Bytes per
token: what a decode step reads (every Linear weight and its scales, the head; not the
embedding). Load: seconds to construct the LLM (weights, tokenizer, KV cache).

Kernels (`--kernels`): the GEMV at one row on each weight shape of both models, every layer's
weight of that shape in turn (as a decode step reads them; the L3 here is 300 MiB), GB/s of the
repacked bytes; and (`--crossover`) GEMV against dequantize + torch matmul (and, on AVX2, the
int16 GEMM) by rows of x.

    python benchmarks/gguf_native.py --json benchmarks/results/gguf_native.json
    python benchmarks/gguf_native.py --kernels --crossover
    python benchmarks/gguf_native.py --batched --threads 1

Batched (`--batched`): aggregate decode tokens per CPU-second at batch 1, 4, 8 and 32, native
and then the same model dequantized to bf16 and packed, in one process.

Perplexity (`--perplexity WIKI`, gensim's Wikipedia sample, see benchmarks/perplexity.py): each
token scored by a decode step of its own (one row of x: the GEMV, which on AVX2-only CPUs rounds
x to int16 per group of 32), native against the same weights dequantized to
float32 (exact: torch's matmul on d q + m), on the same token ids.

    python benchmarks/gguf_native.py --perplexity /tmp/gensim/.../enwiki-...-shortened.bz2
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

MODELS = {"smollm2": "smollm2-135m-instruct", "qwen": "qwen2.5-coder-0.5b-instruct"}
THREADS = int(os.environ.get("THRIFTY_BENCH_THREADS", "2"))
PROMPT = "Write a Python function that checks whether a number is prime, with a docstring."


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def weight_bytes(model) -> int:
    """Bytes of every Linear weight (and its scales) a decode step reads, tied head included."""
    from thrifty.models.layers import Linear

    total = 0
    for m in model.modules():
        if isinstance(m, Linear):
            total += m.weight.numel() * m.weight.element_size()
            if m.weight_scale_inv is not None:
                total += m.weight_scale_inv.numel() * m.weight_scale_inv.element_size()
    return total


def model_bytes(model) -> int:
    """Bytes of the model's tensors (parameters and buffers, shared ones once), KV cache aside."""
    seen, total = set(), 0
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        if "cache" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def run_thrifty(model_name: str, variant: str, tokens: int) -> dict:
    import torch

    from thrifty import LLM, SamplingParams
    from thrifty.loader.gguf_weights import dequantize_model
    from thrifty.models.layers import pack_linears

    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    # native: what `thrifty run` does (--dtype auto: float32 activations on a CPU without
    # AVX-512 BF16); bf16: the old path, bf16 throughout.
    dtype = "bfloat16" if variant == "bf16" else "auto"
    llm = LLM(model_name, num_threads=THREADS, progress=False, kv_cache_memory_bytes=64 << 20,
              dtype=dtype)  # fmt: skip
    load_s = time.perf_counter() - start
    model = llm.engine.runner.model
    if variant == "bf16":
        dequantize_model(model, torch.bfloat16)
        pack_linears(model)
        from thrifty.loader.weights import release_freed_memory

        release_freed_memory()
    rss = rss_mib()  # the process, KV cache (64 MiB), tokenizer and all
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0))  # warm-up, builds kernels
    engine = llm.engine
    rid = engine.add_request(PROMPT, params)
    times = []
    while engine.has_unfinished():
        engine.step()
        times.append(time.perf_counter())
    engine.pop_finished(rid)
    return {
        "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
        "rss_mib": rss,
        "load_s": load_s,
        "weight_bytes_per_token": weight_bytes(model),
        "model_bytes": model_bytes(model),
    }


LLAMA_CPP = r"""
import json, sys, time, os
import llama_cpp
path, prompt, tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
llm = llama_cpp.Llama(path, n_threads=threads, n_ctx=512, verbose=False)
load_s = time.perf_counter() - start
rss = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:")][0]
times = []
for tok in llm.generate(llm.tokenize(prompt.encode()), temp=0.0):
    times.append(time.perf_counter())
    if len(times) == tokens:
        break
print(json.dumps({"decode_tok_s": (len(times) - 1) / (times[-1] - times[0]), "rss_mib": rss,
                  "load_s": load_s, "weight_bytes_per_token": os.path.getsize(path)}))
"""


def run_llama_cpp(python: str, model_name: str, tokens: int) -> dict:
    from thrifty import hub

    path = hub.pull(model_name, progress=False)
    cmd = [python, "-c", LLAMA_CPP, str(path), PROMPT, str(tokens), str(THREADS)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def decode(args: argparse.Namespace) -> None:
    variants = ["native", "bf16"] + (["llama.cpp"] if args.llama_cpp_python else [])
    results: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for key in args.models.split(","):
            # Each round starts with another engine: a fixed order would give one of them the
            # same place in the machine's swings every round.
            for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
                if v == "llama.cpp":
                    res = run_llama_cpp(args.llama_cpp_python, MODELS[key], args.tokens)
                else:
                    cmd = [sys.executable, __file__, "--child", f"{key}:{v}"]
                    cmd += ["--tokens", str(args.tokens)]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                res["load_average"] = os.getloadavg()[0]
                results.setdefault(f"{key} {v}", []).append(res)
                print(
                    f"round {r} {key} {v}: {res['decode_tok_s']:.1f} tok/s, load "
                    f"{res['load_s']:.1f} s, RSS {res['rss_mib']:.0f} MiB "
                    f"(load average {res['load_average']:.1f})",
                    flush=True,
                )
    from throughput import git_revision, machine

    where, revision = machine(), git_revision()
    header = (
        f"{where['cpu']} ({', '.join(where['features'])}), {THREADS} threads, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, thrifty {revision}; "
        f"{args.rounds} rounds, {args.tokens} greedy tokens, medians:"
    )
    table = [
        "| model | weights | decode b=1 tok/s | MiB read per token | model MiB | load s "
        "| RSS after load MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for name, runs in results.items():
        row = {
            "name": name,
            "decode_tok_s": statistics.median(x["decode_tok_s"] for x in runs),
            "decode_tok_s_runs": [x["decode_tok_s"] for x in runs],
            "load_s": statistics.median(x["load_s"] for x in runs),
            "rss_mib": statistics.median(x["rss_mib"] for x in runs),
            "mib_per_token": runs[0]["weight_bytes_per_token"] / 2**20,
            "model_mib": runs[0].get("model_bytes", 0) / 2**20,
            "load_average": [x["load_average"] for x in runs],
        }
        rows.append(row)
        model, variant = name.split(" ", 1)
        table.append(
            f"| {model} | {variant} | {row['decode_tok_s']:.1f} | {row['mib_per_token']:.0f} | "
            f"{row['model_mib']:.0f} | {row['load_s']:.1f} | {row['rss_mib']:.0f} |"
        )
    rounds = ["", "Per round, tok/s (each round started with the next engine):", ""]
    rounds += [f"- {row['name']}: {', '.join(f'{x:.1f}' for x in row['decode_tok_s_runs'])}"
               for row in rows]  # fmt: skip
    report = "\n".join([header, "", *table, *rounds]) + "\n"
    print("\n" + report, end="")
    if args.json:
        args.json.with_suffix(".md").write_text(report)
        meta = {
            "machine": where,
            "revision": revision,
            "threads": THREADS,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "note": "load_average per run: the machine was shared unless it is near 0",
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def _median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernels(args: argparse.Namespace) -> None:
    import torch

    from thrifty import hub
    from thrifty.config import ModelConfig, resolve_dtype
    from thrifty.kernels import ggml as ggml_kernels
    from thrifty.loader.weights import load_model
    from thrifty.models.layers import Linear
    from thrifty.quant import ggml

    torch.set_num_threads(THREADS)
    print(f"threads {THREADS}, load average {os.getloadavg()[0]:.1f}")
    for key in args.models.split(","):
        path = hub.resolve(MODELS[key], progress=False)
        dtype = resolve_dtype("auto", path, "cpu")  # x as `thrifty run` has it on this CPU
        print(f"\n{key}: x in {dtype}, kernels {ggml_kernels.kernel().name}")
        model = load_model(path, ModelConfig.from_dir(path), dtype=dtype)
        shapes: dict[tuple, list] = {}
        for m in model.modules():
            if isinstance(m, Linear) and m.weight_scale_inv is not None:
                w, s = m.weight, m.weight_scale_inv
                fmt = ggml.format_of(w, s)
                shapes.setdefault((*fmt, w.shape[0], ggml.in_features(w, s)), []).append((w, s))
        if args.kernels:
            print(f"\n{key}: GEMV at 1 row, each shape's weights in turn")
            print("| format | N x K | weights | MiB each | us each | GB/s |")
            print("|---|---|---|---|---|---|")
            for (fmt, group, n, k), ws in sorted(shapes.items(), key=lambda kv: -len(kv[1])):
                x = torch.randn(1, k, dtype=dtype)
                nbytes = sum(w.numel() * w.element_size() + 4 * s.numel() for w, s in ws)

                def sweep(x=x, ws=ws):
                    for w, s in ws:
                        ggml_kernels.gemv(x, w, s)

                t = _median_s(sweep, args.reps)
                print(
                    f"| {fmt}/{group} | {n} x {k} | {len(ws)} | {nbytes / len(ws) / 2**20:.2f} "
                    f"| {t / len(ws) * 1e6:.0f} | {nbytes / t / 1e9:.1f} |"
                )
        if args.crossover:
            # AVX2 builds also have the int16 GEMM (x rounded to int16, blocked for registers).
            paths = {"GEMV": ggml_kernels.gemv, "GEMM": ggml_kernels.gemm}
            if ggml_kernels.i16_rows():
                paths["int16 GEMM"] = ggml_kernels.gemm_i16
            print(f"\n{key}: GEMV vs dequantize + torch matmul, us per call (first weight)")
            print(f"| format | N x K | rows | {' | '.join(paths)} |")
            print("|---|---|---|" + "---|" * len(paths))
            for (fmt, group, n, k), ws in sorted(shapes.items(), key=lambda kv: -len(kv[1])):
                w, s = ws[0]
                for rows in (1, 4, 6, 8, 12, 16, 24, 32, 64, 128):
                    x = torch.randn(rows, k, dtype=dtype)
                    us = " | ".join(
                        f"{_median_s(lambda f=f, x=x, w=w, s=s: f(x, w, s), args.reps) * 1e6:.0f}"
                        for f in paths.values()
                    )
                    print(f"| {fmt}/{group} | {n} x {k} | {rows} | {us} |")


def batched(args: argparse.Namespace) -> None:
    """Aggregate decode tokens per CPU-second at several batch sizes, native against the same
    model dequantized to packed bf16, both loaded in one process and run in turns (`--rounds`,
    medians; CPU time: a shared machine's waits for a core do not count)."""
    import torch

    from thrifty import LLM, SamplingParams
    from thrifty.loader.gguf_weights import dequantize_model
    from thrifty.models.layers import pack_linears

    torch.set_num_threads(THREADS)
    batches = (1, 4, 8, 32)
    print(f"threads {THREADS}, load average {os.getloadavg()[0]:.1f}, {args.rounds} rounds")
    print("| model | batch | native tok/s per CPU-s | bf16 tok/s per CPU-s | native / bf16 |")
    print("|---|---|---|---|---|")
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)

    def run(llm, batch: int) -> float:
        prompts = [f"Write a story about item {i}." for i in range(batch)]
        llm.generate(prompts, SamplingParams(max_tokens=2))
        start = time.process_time()
        llm.generate(prompts, params)
        return batch * params.max_tokens / (time.process_time() - start)

    for key in args.models.split(","):
        native = LLM(MODELS[key], num_threads=THREADS, progress=False)
        dense = LLM(MODELS[key], num_threads=THREADS, progress=False)
        model = dense.engine.runner.model
        dequantize_model(model, torch.bfloat16)
        pack_linears(model)
        for b in batches:
            got: dict[str, list[float]] = {"native": [], "dense": []}
            for r in range(args.rounds):
                order = ("native", "dense") if r % 2 == 0 else ("dense", "native")
                for name in order:
                    got[name].append(run(native if name == "native" else dense, b))
            n, d = statistics.median(got["native"]), statistics.median(got["dense"])
            pairs = zip(got["native"], got["dense"], strict=True)
            ratio = statistics.median(a / c for a, c in pairs)
            print(f"| {key} | {b} | {n:.1f} | {d:.1f} | {ratio:.2f}x |", flush=True)


def teacher_forced_perplexity(model, cfg, ids, block: int = 16, kv_cache_dtype=None) -> float:
    """exp(mean NLL) of ids[1:], each token's logits from a decode step of one row (over a KV
    cache in kv_cache_dtype; None: the activations' float32)."""
    import math

    import torch

    from thrifty.config import EngineConfig
    from thrifty.engine.model_runner import ModelRunner
    from thrifty.models.attention import build_metadata, forward_context

    blocks = len(ids) // block + 2
    table = list(range(1, blocks))
    config = EngineConfig(
        dtype=torch.float32,
        block_size=block,
        num_kv_blocks=blocks + 1,
        kv_cache_dtype=kv_cache_dtype,
    )
    ModelRunner(model, cfg, config)
    nll = 0.0
    with torch.inference_mode():
        for pos in range(len(ids) - 1):
            with forward_context(build_metadata([1], [pos + 1], [table], block)):
                logits = model.compute_logits(model(ids[pos : pos + 1], torch.tensor([pos])))
            nll += torch.nn.functional.cross_entropy(logits, ids[pos + 1 : pos + 2]).item()
    return math.exp(nll / (len(ids) - 1))


def decode_perplexity(args) -> None:
    import torch
    from perplexity import wiki_text

    from thrifty import hub
    from thrifty.config import ModelConfig
    from thrifty.kernels import ggml as ggml_kernels
    from thrifty.loader.gguf_weights import dequantize_model
    from thrifty.loader.weights import load_model
    from thrifty.tokenizer import Tokenizer

    torch.set_num_threads(THREADS)
    cpu = Path("/proc/cpuinfo").read_text().split("model name")[1].split(":")[1].split("\n")[0]
    print(f"{cpu.strip()}, threads {THREADS}, GEMV rounds x to int16: {ggml_kernels.quantizes_x()}")
    print("| model | tokens | native ppl | float32 ppl | native / float32 |")
    print("|---|---|---|---|---|")
    text = wiki_text(args.perplexity, 40 * args.tokens)
    for key in args.models.split(","):
        path = hub.resolve(MODELS[key], progress=False)
        tokens = Tokenizer.from_dir(path, ()).encode(text, add_special_tokens=False)
        ids = torch.tensor(tokens[: args.tokens])
        cfg = ModelConfig.from_dir(path)
        model = load_model(path, cfg, dtype=torch.float32)
        native = teacher_forced_perplexity(model, cfg, ids)
        dequantize_model(model, torch.float32)
        exact = teacher_forced_perplexity(model, cfg, ids)
        ratio = native / exact
        print(f"| {key} | {len(ids)} | {native:.3f} | {exact:.3f} | {ratio:.4f} |", flush=True)


def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--models", default="smollm2,qwen", help=f"comma-separated: {', '.join(MODELS)}"
    )
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--llama-cpp-python", help="interpreter with llama_cpp installed")
    ap.add_argument("--kernels", action="store_true", help="GB/s of the GEMV per weight shape")
    ap.add_argument("--crossover", action="store_true", help="GEMV against GEMM by rows")
    ap.add_argument("--batched", action="store_true", help="tok/s per CPU-second by batch size")
    ap.add_argument("--perplexity", type=Path, help="gensim's enwiki *-shortened.bz2")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    unknown = [key for key in args.models.split(",") if key not in MODELS]
    if unknown:
        ap.error(f"--models: unknown {unknown[0]!r} (choose from {', '.join(MODELS)})")
    os.environ["THRIFTY_BENCH_THREADS"] = str(args.threads)
    THREADS = args.threads
    if args.child:
        key, variant = args.child.split(":")
        print(json.dumps(run_thrifty(MODELS[key], variant, args.tokens)))
    elif args.perplexity:
        decode_perplexity(args)
    elif args.batched:
        batched(args)
    elif args.kernels or args.crossover:
        kernels(args)
    else:
        decode(args)


if __name__ == "__main__":
    main()
