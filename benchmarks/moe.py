"""One DeepSeek MoE layer on the CPU: experts grouped by token (thrifty) against a per-token loop.

The layer routes like DeepSeek-V3 (sigmoid scores, a correction bias, the best 4 of 8 expert
groups, 8 of 64 routed experts per token, one shared expert) at a reduced width so that it fits
beside other work: hidden 1024, expert width 512 (about 200 MB of bf16 weights). Both methods
compute the same output (checked first); the table gives the median over rounds of the time per
layer call, with the two methods run interleaved so that a neighbour's load hits them alike.

    python benchmarks/moe.py                      # bf16, batch 1 and 64 tokens
    python benchmarks/moe.py --dtype float32 --tokens 1 8 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from thrifty.config import MoEConfig, parse_dtype
from thrifty.models.layers import pack_linears
from thrifty.models.moe import MoE, grouped_experts, naive_experts

RESULTS = Path(__file__).parent / "results"


def build_layer(hidden: int, dtype: torch.dtype, seed: int = 0) -> tuple[MoE, MoEConfig]:
    cfg = MoEConfig(
        num_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=512,
        num_shared_experts=1,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    )
    torch.manual_seed(seed)
    layer = MoE(hidden, cfg)
    for p in layer.parameters():
        p.data = torch.randn(p.shape).mul_(0.02).to(dtype)
    layer.gate.weight.data = layer.gate.weight.data.float()
    layer.gate.e_score_correction_bias.data = torch.randn(cfg.num_experts) * 0.01
    pack_linears(layer)  # the experts' weights as the engine lays them out at load
    return layer, cfg


def time_call(fn, rounds: int) -> list[float]:
    fn()  # warm up
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS / "moe"), help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    load_before = os.getloadavg()[0]
    layer, cfg = build_layer(args.hidden, dtype)
    rows = []
    with torch.inference_mode():
        for n in args.tokens:
            x = torch.randn(n, args.hidden).to(dtype)
            weights, ids = layer.gate(x)
            want = naive_experts(x, weights, ids, layer.experts)
            got = grouped_experts(x, weights, ids, layer.experts)
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)

            def naive_layer(x=x):
                return naive_experts(x, *layer.gate(x), layer.experts) + layer.shared_experts(x)

            grouped, naive, routing = [], [], []
            for _ in range(args.rounds):  # interleaved, one call each per round
                grouped += time_call(partial(layer, x), 1)
                naive += time_call(naive_layer, 1)  # the same routing and shared expert
                routing += time_call(partial(layer.gate, x), 1)
            active = int(ids.unique().numel())
            row = {
                "tokens": n,
                "active_experts": active,
                "grouped_ms": statistics.median(grouped) * 1e3,
                "naive_ms": statistics.median(naive) * 1e3,
                "routing_ms": statistics.median(routing) * 1e3,
            }
            row["speedup"] = row["naive_ms"] / row["grouped_ms"]
            rows.append(row)
            print(
                f"{n:>4} tokens ({active:>2} experts hit): grouped {row['grouped_ms']:7.2f} ms, "
                f"per-token loop {row['naive_ms']:7.2f} ms, x{row['speedup']:.1f} "
                f"(routing {row['routing_ms']:.2f} ms)"
            )
    meta = {
        "dtype": str(dtype).removeprefix("torch."),
        "hidden": args.hidden,
        "config": cfg.__dict__,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "torch": torch.__version__,
        "load_average": [load_before, os.getloadavg()[0]],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"One DeepSeek-V3-style MoE layer (hidden {args.hidden}, 64 experts x 512, top-8 of 4/8 "
        f"groups, 1 shared), {meta['dtype']}, {meta['threads']} threads, median of "
        f"{args.rounds} rounds; 1-minute load average {load_before:.1f} before, "
        f"{meta['load_average'][1]:.1f} after (timings are only comparable on an idle machine).",
        "",
        "| tokens | experts hit | grouped (thrifty) ms | per-token loop ms | speed-up |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['tokens']} | {r['active_experts']} | {r['grouped_ms']:.2f} | {r['naive_ms']:.2f} "
        f"| {r['speedup']:.1f}x |"
        for r in rows
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
