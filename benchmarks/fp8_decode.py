"""Batch-1 decode of Qwen2.5-0.5B with bf16 against FP8 weights, and llama.cpp on a Q8_0 GGUF.

Each variant runs in its own process (so resident memory is its own), variants interleaved
round by round; medians over rounds. Variants:
- bf16: the GGUF's weights dequantized to bf16 (thrifty otherwise keeps the GGUF's Q8_0 blocks
  and runs them natively, since adffe12: that is the `gguf-native` variant, not in the default);
- fp8: the same, `quantization="fp8"` (linear weights in E4M3 + UE8M0 block scales; embeddings,
  norms and lm_head stay bf16, as in DeepSeek's checkpoints);
- fp8-all: `quantization="fp8-all"`, the untied lm_head in FP8 too (as llama.cpp's Q8_0 does
  with its output tensor), which shows what the bf16 head costs;
- llama.cpp Q8_0: with `--llama-cpp-python PYTHON` (an interpreter with llama_cpp installed),
  the GGUF requantized to Q8_0 by llama.cpp's own quantizer, generating the same token count.

Decode tok/s: tokens after the first / the time after the first token (greedy, EOS ignored).
Weight bytes are those a decode step reads (every linear weight, the head; not the embedding).

    python benchmarks/fp8_decode.py --json benchmarks/results/fp8_decode.json \\
        --llama-cpp-python /tmp/llamacpp/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "qwen2.5-coder-0.5b-instruct"
THREADS = int(os.environ.get("THRIFTY_BENCH_THREADS", "2"))  # --threads sets it for children
PROMPT = "Write a Python function that checks whether a number is prime, with a docstring."


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_thrifty(variant: str, tokens: int, dtype: str) -> dict:
    import torch

    from thrifty import LLM, SamplingParams
    from thrifty.models.layers import Linear

    torch.set_num_threads(THREADS)
    if variant != "gguf-native":  # the GGUF dequantized to bf16, as the FP8 variants start from
        from thrifty.loader import gguf_weights

        init = gguf_weights.GgufWeights.__init__
        gguf_weights.GgufWeights.__init__ = lambda self, *a, keep, **kw: init(
            self, *a, keep=False, **kw
        )
    quantization = {"bf16": None, "gguf-native": None, "fp8": "fp8", "fp8-all": "fp8-all"}[variant]
    llm = LLM(
        MODEL,
        quantization=quantization,
        dtype=dtype,
        num_threads=THREADS,
        progress=False,
        kv_cache_memory_bytes=64 << 20,
    )
    model = llm.engine.runner.model
    read = sum(
        m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, Linear)
    )
    rss = rss_mib()
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0))  # warm-up, builds kernels
    engine = llm.engine
    rid = engine.add_request(PROMPT, params)
    times = []
    while engine.has_unfinished():
        engine.step()
        times.append(time.perf_counter())
    engine.pop_finished(rid)
    decode = (len(times) - 1) / (times[-1] - times[0])
    return {"decode_tok_s": decode, "rss_mib": rss, "weight_bytes_per_token": read}


LLAMA_CPP = r"""
import json, sys, time, os
import llama_cpp
src, q8, prompt = sys.argv[1], sys.argv[2], sys.argv[5]
tokens, threads = int(sys.argv[3]), int(sys.argv[4])
if not os.path.exists(q8):
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    p.allow_requantize = True
    p.nthread = threads
    assert llama_cpp.llama_model_quantize(src.encode(), q8.encode(), p) == 0
llm = llama_cpp.Llama(q8, n_threads=threads, n_ctx=512, verbose=False)
rss = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:")][0]
ids = llm.tokenize(prompt.encode())
times = []
for i, tok in enumerate(llm.generate(ids, temp=0.0)):
    times.append(time.perf_counter())
    if len(times) == tokens:
        break
print(json.dumps({"decode_tok_s": (len(times) - 1) / (times[-1] - times[0]), "rss_mib": rss,
                  "weight_bytes_per_token": os.path.getsize(q8)}))
"""


def run_llama_cpp(python: str, q8: Path, tokens: int) -> dict:
    from thrifty import hub

    src = hub.pull(MODEL, progress=False)
    out = subprocess.run(
        [
            python,
            "-c",
            LLAMA_CPP,
            str(src),
            str(q8),
            str(tokens),
            os.environ["THRIFTY_BENCH_THREADS"],
            PROMPT,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="bf16,fp8,fp8-all")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-cpp-python", help="interpreter with llama_cpp, for the Q8_0 row")
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        help="activations (default bfloat16: the variants are a bf16 checkpoint and its FP8 "
        "twins; `auto` would pick float32 for this GGUF on a CPU without AVX-512 BF16)",
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ["THRIFTY_BENCH_THREADS"] = str(args.threads)
    if args.child:
        print(json.dumps(run_thrifty(args.child, args.tokens, args.dtype)))
        return
    variants = args.variants.split(",")
    if args.llama_cpp_python:
        variants.append("llama.cpp Q8_0")
    q8 = Path(tempfile.gettempdir()) / "thrifty-bench-qwen2.5-0.5b-q8_0.gguf"
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            if v == "llama.cpp Q8_0":
                res = run_llama_cpp(args.llama_cpp_python, q8, args.tokens)
            else:
                cmd = [sys.executable, __file__, "--child", v, "--tokens", str(args.tokens)]
                cmd += ["--dtype", args.dtype]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                res = json.loads(out.stdout.strip().splitlines()[-1])
            res["load_average"] = os.getloadavg()[0]
            results[v].append(res)
            print(f"round {r} {v}: {res['decode_tok_s']:.1f} tok/s, RSS {res['rss_mib']:.0f} MiB")
    rows = []
    base = statistics.median(x["decode_tok_s"] for x in results["bf16"]) if "bf16" in results else 0
    for v, runs in results.items():
        tok_s = statistics.median(x["decode_tok_s"] for x in runs)
        # Each round's ratio to the bf16 run just before it: a shared machine's memory bandwidth
        # drifts over minutes, and a ratio within a round sees the same drift on both sides.
        paired = None
        if "bf16" in results:
            pairs = zip(runs, results["bf16"], strict=True)
            paired = statistics.median(x["decode_tok_s"] / b["decode_tok_s"] for x, b in pairs)
        rows.append(
            {
                "variant": v,
                "decode_tok_s": tok_s,
                "decode_tok_s_runs": [x["decode_tok_s"] for x in runs],
                "vs_bf16": tok_s / base if base else None,
                "vs_bf16_paired": paired,
                "rss_mib": statistics.median(x["rss_mib"] for x in runs),
                "weight_mib_per_token": runs[0]["weight_bytes_per_token"] / 2**20,
            }
        )
    print()
    print(
        "| weights | decode b=1 tok/s | vs bf16 | vs bf16, median of rounds | MiB read per token"
        " | RSS after load MiB |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        paired = f"{row['vs_bf16_paired']:.2f}x" if row["vs_bf16_paired"] else "-"
        print(
            f"| {row['variant']} | {row['decode_tok_s']:.1f} | {row['vs_bf16']:.2f}x | {paired} | "
            f"{row['weight_mib_per_token']:.0f} | {row['rss_mib']:.0f} |"
        )
    if args.json:
        meta = {
            "model": MODEL,
            "threads": args.threads,
            "dtype": args.dtype,
            "cpu": _cpu(),
            "tokens": args.tokens,
            "rounds": args.rounds,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "note": "load_average per run: the machine was shared unless it is near 0",
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
