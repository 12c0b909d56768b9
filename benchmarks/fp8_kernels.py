"""FP8 (E4M3, 128x128 block scales) linear on the CPU against bf16, and the machine's bandwidth.

Measures, interleaved round by round on the same shapes (Qwen2.5-0.5B's decode matmuls):
- memory bandwidth: a torch copy of a 256 MiB buffer (read + write bytes per second);
- bf16: what a bf16 model runs, kernels.packed_linear on the packed bf16 weight (AVX-512 BF16,
  or AMX from kernels.AMX_MIN_ROWS rows where the CPU has it);
- fp8: what an FP8 model runs, kernels.fp8.packed_linear on the packed FP8 weight (half the
  bytes; AVX-512 BF16, or AMX from fp8.amx_min_rows() rows);
- fp8-avx512: the same packed weight on the AVX-512 GEMV at every M (where AMX takes over);
- fp8-rowmajor: kernels.fp8.fp8_linear on the weight in the checkpoint's layout (the kernel
  unpackable weights and float32 models use);
- fp8-ref: the pure-torch reference (dequantize the whole weight, then matmul), M=1 only.
Every call reads a different weight copy, rotating over --rotate-mib of FP8 bytes (bf16: twice
that; make it larger than the L3 so weights come from DRAM as in decode). Medians over rounds:
microseconds per call and weight GB/s; the load average is printed beside each row.

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


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def bench(n: int, k: int, m: int, rounds: int, rotate_bytes: int) -> dict[str, float]:
    copies = max(2, -(-rotate_bytes // (n * k)))  # counted in fp8 bytes: bf16 rotates over 2x
    w = torch.randn(n, k) * 0.02
    q, s = fp8.quantize(w, "ue8m0")
    bf = [kernels.pack_weight(w.bfloat16()) for _ in range(copies)]
    f8 = [(q.clone(), s.clone()) for _ in range(copies)]
    packed = [(fp8_kernels.pack(q), s.clone()) for _ in range(copies)]
    x = torch.randn(m, k).bfloat16()
    ext = fp8_kernels.PACKED.load()
    methods = {
        "bf16": lambda i: kernels.packed_linear(x, bf[i]),
        "fp8": lambda i: fp8_kernels.packed_linear(x, *packed[i]),
        "fp8-rowmajor": lambda i: fp8_kernels.fp8_linear(x, *f8[i], 128),
    }
    if 0 < fp8_kernels.amx_min_rows() <= m:
        methods["fp8-avx512"] = lambda i: ext.fp8_packed_linear(x, *packed[i], None, 0)
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
    ap.add_argument("--rotate-mib", type=int, default=384)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (fp8_kernels.available() and fp8_kernels.packed_available()):
        raise SystemExit("the fp8 kernels are not available on this machine")
    bw = bandwidth_gbs()
    print(
        f"{cpu_name()}; copy bandwidth: {bw:.1f} GB/s (read + write); threads "
        f"{torch.get_num_threads()}; AMX from {fp8_kernels.amx_min_rows() or '-'} rows (fp8)"
    )
    rows = []
    print(
        "| shape | M | bf16 us | fp8 us | fp8 speed-up | bf16 GB/s | fp8 GB/s | fp8-avx512 us "
        "| fp8-rowmajor us | fp8-ref us | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
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
                "fp8_avx512_us": t.get("fp8-avx512", nan) * 1e6,
                "fp8_rowmajor_us": t["fp8-rowmajor"] * 1e6,
                "fp8_ref_us": t.get("fp8-ref", nan) * 1e6,
                "load_average": os.getloadavg()[0],
            }
            rows.append(row)
            print(
                f"| {name} {n}x{k} | {m} | {row['bf16_us']:.0f} | {row['fp8_us']:.0f} | "
                f"{row['bf16_us'] / row['fp8_us']:.2f}x | {row['bf16_gbs']:.1f} | "
                f"{row['fp8_gbs']:.1f} | {row['fp8_avx512_us']:.0f} | "
                f"{row['fp8_rowmajor_us']:.0f} | {row['fp8_ref_us']:.0f} | "
                f"{row['load_average']:.1f} |",
                flush=True,
            )
    if args.json:
        meta = {
            "machine": cpu_name(),
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
