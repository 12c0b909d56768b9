"""Fairness under the worst request the server accepts, on loopback, bounded in time.

Client A sends, again and again, the most expensive completion request a default server takes:
`--max-n` (16) different prompts of nearly the whole context each (no two share a prefix, so the
prefix cache cannot help), streaming. Meanwhile client B asks a short chat question once a second
and records its time to first token. Run once per `--long-prefill-tokens` setting (the scheduler's
fair default, 256, and 10^9, which is first come first served as before), each on a fresh server.

    .venv/bin/python benchmarks/fairness.py [--duration 40] [--out fairness]

Writes benchmarks/results/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
from serve_load import free_port, wait_up

MODEL = "smollm2-135m-instruct"
RESULTS = Path(__file__).parent / "results"
CONTEXT = 2048
WORDS = ["river", "stone", "cloud", "market", "engine", "violet", "thunder", "paper", "garden",
         "silver", "orbit", "candle"]  # fmt: skip


def flood_prompts(rng: random.Random, n: int, words: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def measure(long_prefill: int, args: argparse.Namespace) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "thrifty", "serve", MODEL, "--port", str(port),
           "--max-model-len", str(CONTEXT), "--long-prefill-tokens", str(long_prefill)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url)
        stop = threading.Event()
        flood_done = []
        rng = random.Random(0)

        def flood() -> None:
            while not stop.is_set():
                # ~1,900 tokens each: the context less room for 16 generated tokens
                body = {"model": MODEL, "prompt": flood_prompts(rng, 16, 1800),
                        "max_tokens": 16, "stream": True}  # fmt: skip
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
                    for _ in r.iter_lines():
                        if stop.is_set():
                            break
                flood_done.append(time.perf_counter())

        a = threading.Thread(target=flood, daemon=True)
        a.start()
        time.sleep(3)  # A's prompts are queued and prefilling
        ttft: list[float] = []
        end = time.perf_counter() + args.duration
        while time.perf_counter() < end:
            ask = [{"role": "user", "content": "What is the capital of France?"}]
            body = {"model": MODEL, "stream": True, "max_tokens": 8, "messages": ask}
            start = time.perf_counter()
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    if '"content":' in line and '"content": ""' not in line:
                        ttft.append(time.perf_counter() - start)
                        break
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - start)))
        stop.set()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    q = statistics.quantiles(ttft, n=20) if len(ttft) > 1 else ttft * 19
    return {"long_prefill_tokens": long_prefill, "b_requests": len(ttft),
            "ttft_p50": statistics.median(ttft), "ttft_p95": q[18], "ttft_max": max(ttft),
            "flood_requests_done": len(flood_done)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of B's questions")
    ap.add_argument("--settings", type=int, nargs="+", default=[256, 10**9])
    ap.add_argument("--out", default="fairness")
    args = ap.parse_args()
    rows = [measure(s, args) for s in args.settings]
    lines = [
        "| --long-prefill-tokens | B's requests | TTFT p50 s | p95 s | max s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['long_prefill_tokens']} | {r['b_requests']} | {r['ttft_p50']:.2f} |"
                     f" {r['ttft_p95']:.2f} | {r['ttft_max']:.2f} |")  # fmt: skip
    print("\n".join(lines))
    meta = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load": os.getloadavg(), "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
