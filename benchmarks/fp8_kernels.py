"""FP8 (E4M3, 128x128 block scales) linear on the CPU against bf16, and the machine's bandwidth.

Measures, interleaved round by round on the same shapes (Qwen2.5-0.5B's decode matmuls):
- memory bandwidth: a torch copy of a 256 MiB buffer (read + write bytes per second);
- bf16: thrifty's AVX-512 BF16 GEMV (or torch's matmul for larger M) on a bf16 weight;
- fp8: thrifty.kernels.fp8.fp8_linear on the same weight in FP8 (half the bytes);
- fp8-ref: the pure-torch reference (dequantize the whole weight, then matmul), M=1 only.
Every call reads a different weight copy, rotating over more than the L3, so weights come from
DRAM as in decode. Medians over rounds: microseconds per call and weight GB/s.

    python benchmarks/fp8_kernels.py                  # M in 1 2 4 8 16 64
    python benchmarks/fp8_kernels.py --m 1 --json benchmarks/results/fp8_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from thrifty import kernels
from thrifty.kernels import fp8 as fp8_kernels
from thrifty.quant import fp8

SHAPES = {  # Qwen2.5-0.5B: hidden 896, ffn 4864, vocab 151936; (out_features, in_features)
    "qkv": (1152, 896),
    "o": (896, 896),
    "gate_up": (9728, 896),
    "down": (896, 4864),
}


def bandwidth_gbs(nbytes: int = 256 << 20, rounds: int = 7) -> float:
    """Copy bandwidth (bytes read + bytes written per second), the median of `rounds` copies."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times) / 1e9


def bf16_call(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if x.shape[0] <= kernels.MAX_ROWS and kernels.available():
        return kernels.bf16_linear(x, w)
    return F.linear(x, w)


def bench(n: int, k: int, m: int, rounds: int, rotate_bytes: int) -> dict[str, float]:
    copies = max(2, -(-rotate_bytes // (n * k)))  # counted in fp8 bytes: bf16 rotates over 2x
    w = torch.randn(n, k) * 0.02
    q, s = fp8.quantize(w, "ue8m0")
    bf = [w.bfloat16().clone() for _ in range(copies)]
    f8 = [(q.clone(), s.clone()) for _ in range(copies)]
    x = torch.randn(m, k).bfloat16()
    methods = {
        "bf16": lambda i: bf16_call(x, bf[i]),
        "fp8": lambda i: fp8_kernels.fp8_linear(x, *f8[i], 128),
    }
    if m == 1:
        methods["fp8-ref"] = lambda i: fp8.reference_linear(x, *f8[i])
    calls = {name: max(copies, 8 if name == "fp8-ref" else 64) for name in methods}
    results: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            fn(0)
            t = time.perf_counter()
            for i in range(calls[name]):
                fn(i % copies)
            results[name].append((time.perf_counter() - t) / calls[name])
    return {name: statistics.median(v) for name, v in results.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rotate-mib", type=int, default=96)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not fp8_kernels.available():
        raise SystemExit("the fp8 kernel is not available on this machine")
    bw = bandwidth_gbs()
    print(f"copy bandwidth: {bw:.1f} GB/s (read + write); threads {torch.get_num_threads()}")
    rows = []
    print("| shape | M | bf16 us | fp8 us | fp8 speed-up | bf16 GB/s | fp8 GB/s | fp8-ref us |")
    print("|---|---|---|---|---|---|---|---|")
    for m in args.m:
        for name, (n, k) in SHAPES.items():
            t = bench(n, k, m, args.rounds, args.rotate_mib << 20)
            row = {
                "shape": name,
                "n": n,
                "k": k,
                "m": m,
                "bf16_us": t["bf16"] * 1e6,
                "fp8_us": t["fp8"] * 1e6,
                "bf16_gbs": 2 * n * k / t["bf16"] / 1e9,
                "fp8_gbs": n * k / t["fp8"] / 1e9,
                "fp8_ref_us": t.get("fp8-ref", float("nan")) * 1e6,
            }
            rows.append(row)
            print(
                f"| {name} {n}x{k} | {m} | {row['bf16_us']:.0f} | {row['fp8_us']:.0f} | "
                f"{row['bf16_us'] / row['fp8_us']:.2f}x | {row['bf16_gbs']:.1f} | "
                f"{row['fp8_gbs']:.1f} | {row['fp8_ref_us']:.0f} |"
            )
    if args.json:
        meta = {
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "copy_bandwidth_gbs": bw,
            "load_average": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
