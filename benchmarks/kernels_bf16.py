"""bf16 linear at decode-sized M on the CPU: torch's F.linear, oneDNN with a prepacked weight, and
thrifty's two AVX-512 BF16 kernels: the GEMV on the checkpoint's layout (kernels.bf16_linear) and
the kernel on the packed layout the engine loads weights into (kernels.packed_linear).

Each call reads a different copy of the weight, rotating over enough copies (> 2x L3) that the
weight comes from DRAM, as it does in a real decode step. The methods run interleaved, round by
round, so a neighbour's load on a shared machine hits them alike; the table shows medians over
rounds: microseconds per call and weight bytes read per second.

    python benchmarks/kernels_bf16.py                       # all shapes, M in 1 2 4 8 16 32
    python benchmarks/kernels_bf16.py --m 1 --shapes smollm2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from thrifty import kernels

# (out_features, in_features) of the decode matmuls of two small models.
SHAPES = {
    "smollm2": {  # SmolLM2-135M: hidden 576, ffn 1536, 30 layers, vocab 49152
        "qkv": (960, 576),
        "gate_up": (3072, 576),
        "o": (576, 576),
        "down": (576, 1536),
        "lm_head": (49152, 576),
    },
    "qwen2.5-0.5b": {  # hidden 896, ffn 4864, 24 layers, vocab 151936
        "qkv": (1152, 896),
        "gate_up": (9728, 896),
        "down": (896, 4864),
        "lm_head": (151936, 896),
    },
}
SMOLLM2_LAYERS = 30

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _mkldnn_available() -> bool:
    ops = torch.ops.mkldnn
    return hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


def methods(m: int) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Linear]]:
    """name -> (prepare a weight copy, call with (x, prepared weight))."""
    out: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Linear]] = {
        "torch": (lambda w: w, lambda x, w: F.linear(x, w)),
    }
    if _mkldnn_available():
        out["mkldnn"] = (
            lambda w: torch.ops.mkldnn._reorder_linear_weight(w, m),
            lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
        )
    if kernels.available():
        out["gemv"] = (lambda w: w, lambda x, w: kernels.bf16_linear(x, w, None))
        out["packed"] = (
            kernels.pack_weight,
            lambda x, w: kernels._extension().packed_linear(x, w, None),
        )
    if kernels.amx_available() and m >= 1:
        out["amx"] = (
            kernels.pack_weight,
            lambda x, w: kernels._amx().amx_packed_linear(x, w, None),
        )
    return out


def time_round(fn: Linear, x: torch.Tensor, weights: list[torch.Tensor], calls: int) -> float:
    """Seconds per call over `calls` calls, each on the next weight copy."""
    start = time.perf_counter()
    for i in range(calls):
        fn(x, weights[i % len(weights)])
    return (time.perf_counter() - start) / calls


def bench_shape(
    out_f: int, in_f: int, m: int, rounds: int, rotate_bytes: int, min_calls: int
) -> dict[str, float]:
    """Median seconds per call of each method for x (m, in_f) and weight (out_f, in_f)."""
    nbytes = out_f * in_f * 2
    copies = max(1, -(-rotate_bytes // nbytes))
    calls = max(copies, min_calls)
    plain = [torch.randn(out_f, in_f, dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(m, in_f, dtype=torch.bfloat16)
    runs = {}
    for name, (prepare, fn) in methods(m).items():
        weights = [prepare(w) for w in plain]
        fn(x, weights[0])  # warm up (oneDNN builds its primitive on the first call)
        runs[name] = (fn, weights)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (fn, weights) in runs.items():
            times[name].append(time_round(fn, x, weights, calls))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="rows of x")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--rounds", type=int, default=9, help="timed rounds per method (median)")
    p.add_argument("--rotate-mb", type=int, default=128, help="weight copies to rotate over, MB")
    p.add_argument("--min-calls", type=int, default=20, help="calls per timed round")
    args = p.parse_args()

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ", end="")
    print(f"thrifty kernel {'available' if kernels.available() else 'NOT available'}")
    print("| model | matmul | out x in | M | method | µs | GB/s |")
    print("|---|---|---|---|---|---|---|")
    step_s: dict[tuple[int, str], float] = {}  # (M, method) -> SmolLM2 matmul seconds per step
    for model in args.shapes:
        for name, (out_f, in_f) in SHAPES[model].items():
            for m in args.m:
                medians = bench_shape(
                    out_f, in_f, m, args.rounds, args.rotate_mb << 20, args.min_calls
                )
                for method, t in medians.items():
                    gbps = out_f * in_f * 2 / t / 1e9
                    print(
                        f"| {model} | {name} | {out_f}x{in_f} | {m} | {method} "
                        f"| {t * 1e6:.1f} | {gbps:.1f} |",
                        flush=True,
                    )
                    if model == "smollm2":
                        per_step = 1 if name == "lm_head" else SMOLLM2_LAYERS
                        step_s[m, method] = step_s.get((m, method), 0.0) + per_step * t
    if "smollm2" in args.shapes:
        print("\nSmolLM2-135M, all matmuls of one decode step (30 layers + lm_head):")
        for (m, method), t in sorted(step_s.items()):
            print(f"  M={m:<3d} {method:8s} {t * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
