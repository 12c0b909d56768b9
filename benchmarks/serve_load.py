"""Load test for `thrifty serve`, on loopback only, bounded in time and in request count.

Starts a server (or uses --url), then measures, in order:
  1. decode throughput of 1 stream and of 16 concurrent streams (the ratio is the batching gain);
  2. N concurrent streaming chat clients (default 64) for D seconds (default 60): requests/s,
     tokens/s, p50/p99 time to first token and inter-token latency, errors;
  3. that afterwards no KV block is held and the server's memory is back to its idle level
     (measured after a 5 s warm-up burst, which touches the KV-cache pages a full batch uses);
  4. a disconnect storm (clients that drop mid-stream or before the first token): zero blocks held.

    .venv/bin/python benchmarks/serve_load.py [--clients 64] [--duration 60] [--out NAME]

Writes benchmarks/results/NAME.json and .md (default NAME: serve_load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx

from thrifty.server.metrics import unlabelled

MODEL = "smollm2-135m-instruct"
RESULTS = Path(__file__).parent / "results"
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "Give me three tips for learning Python.",
    "Why is the sky blue?",
    "Name five fruits and their colours.",
    "What does HTTP stand for?",
    "Summarise the plot of Romeo and Juliet.",
]


@dataclass
class Stats:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str) -> None:
    """Until the server at `url` answers /health (5 minutes at most: a first start compiles)."""
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metrics(url: str) -> dict[str, float]:
    return unlabelled(httpx.get(f"{url}/metrics").text)


def wait_idle(url: str, timeout: float = 10.0) -> tuple[float, dict[str, float]]:
    """Seconds until no sequence runs or waits and no block is held, and the metrics then."""
    start = time.perf_counter()
    while True:
        m = metrics(url)
        busy = m["thrifty_num_seqs_running"] + m["thrifty_num_seqs_waiting"]
        if busy == 0 and m["thrifty_kv_blocks_used"] == 0:
            return time.perf_counter() - start, m
        if time.perf_counter() - start > timeout:
            return float("inf"), m
        time.sleep(0.05)


async def stream_chat(
    client: httpx.AsyncClient, question: str, max_tokens: int, stats: Stats, drop_after=None
) -> None:
    """One streamed chat request; `drop_after`: leave after that many chunks (a disconnect)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                stats.errors.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    stats.errors.append(str(chunk["error"]))
                    return
                if chunk.get("usage"):
                    stats.tokens += chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    if last is None:
                        stats.ttft.append(now - start)
                    else:
                        stats.itl.append(now - last)
                    last = now
                chunks += 1
                if drop_after is not None and chunks >= drop_after:
                    return  # leaving the `async with` closes the connection mid-stream
        stats.requests += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        stats.errors.append(f"{type(e).__name__}: {e}")


async def load(url: str, clients: int, duration: float, max_tokens: int, max_requests: int):
    stats = Stats()
    deadline = time.perf_counter() + duration
    sent = 0
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def worker(i: int) -> None:
            nonlocal sent
            rng = random.Random(i)
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                await stream_chat(client, rng.choice(QUESTIONS), max_tokens, stats)

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.perf_counter() - start
    return stats, wall


async def decode_throughput(url: str, streams: int, max_tokens: int) -> float:
    """Aggregate decode tokens/s of `streams` concurrent greedy streams, over the window in which
    all of them are decoding (after the last first token, before the first last token)."""
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "logprobs": 0}  # fmt: skip

    async def one(client: httpx.AsyncClient) -> list[tuple[float, int]]:
        times = []  # (arrival, tokens in the chunk)
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    if choice["logprobs"]:
                        times.append((time.perf_counter(), len(choice["logprobs"]["tokens"])))
        return times

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        runs = await asyncio.gather(*(one(client) for _ in range(streams)))
    start = max(r[0][0] for r in runs)
    end = min(r[-1][0] for r in runs)
    tokens = sum(n for r in runs for t, n in r if start < t <= end)
    return tokens / (end - start)


async def storm(url: str, clients: int, max_tokens: int) -> Stats:
    stats = Stats()
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await asyncio.gather(
            *(
                stream_chat(client, rng.choice(QUESTIONS), max_tokens, stats, rng.randint(0, 5))
                for _ in range(clients)
            )
        )
    return stats


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) >= 2 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-requests", type=int, default=5000)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out", default="serve_load")
    ap.add_argument("serve_args", nargs="*", help="extra `thrifty serve` flags (after --)")
    args = ap.parse_args()

    proc = None
    url = args.url
    if url is None:
        port = free_port()
        cmd = [sys.executable, "-m", "thrifty", "serve", MODEL, "--port", str(port)]
        proc = subprocess.Popen([*cmd, *args.serve_args])
        url = f"http://127.0.0.1:{port}"
        wait_up(url)
    try:
        results = run(url, proc.pid if proc else None, args)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(results))
    print(markdown(results))


def run(url: str, pid: int | None, args: argparse.Namespace) -> dict:
    asyncio.run(decode_throughput(url, 1, 8))  # warm-up
    single = asyncio.run(decode_throughput(url, 1, args.decode_tokens))
    sixteen = asyncio.run(decode_throughput(url, 16, args.decode_tokens))
    # A short burst at full concurrency first: it touches the KV-cache pages and the allocator
    # caches that a full batch needs, so that the idle level below is the server's steady one.
    asyncio.run(load(url, args.clients, 5.0, args.max_tokens, args.clients))
    wait_idle(url)
    time.sleep(1.0)
    idle_rss = rss_mib(pid) if pid else None

    stats, wall = asyncio.run(
        load(url, args.clients, args.duration, args.max_tokens, args.max_requests)
    )
    idle_after, m = wait_idle(url)
    time.sleep(1.0)
    after_rss = rss_mib(pid) if pid else None

    storm_stats = asyncio.run(storm(url, args.clients, 256))
    storm_idle, m2 = wait_idle(url)
    time.sleep(1.0)
    storm_rss = rss_mib(pid) if pid else None
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_avg_1m_at_end": round(os.getloadavg()[0], 1),
        "model": MODEL,
        "clients": args.clients,
        "duration_s": round(wall, 1),
        "max_tokens": args.max_tokens,
        "requests": stats.requests,
        "errors": len(stats.errors),
        "error_samples": stats.errors[:5],
        "requests_per_s": round(stats.requests / wall, 2),
        "tokens_per_s": round(stats.tokens / wall, 1),
        "ttft_p50_s": round(pct(stats.ttft, 50), 3),
        "ttft_p99_s": round(pct(stats.ttft, 99), 3),
        "itl_p50_s": round(pct(stats.itl, 50), 4),
        "itl_p99_s": round(pct(stats.itl, 99), 4),
        "kv_blocks_used_after": m["thrifty_kv_blocks_used"],
        "seconds_to_idle_after": round(idle_after, 2),
        "rss_idle_mib": idle_rss and round(idle_rss, 1),
        "rss_after_mib": after_rss and round(after_rss, 1),
        "prefix_cache_hit_rate": round(m["thrifty_prefix_cache_hit_rate"], 3),
        "preemptions": m["thrifty_num_preemptions"],
        "decode_tok_s_1_stream": round(single, 1),
        "decode_tok_s_16_streams": round(sixteen, 1),
        "batching_gain_16_vs_1": round(sixteen / single, 2),
        "storm_clients": args.clients,
        "storm_errors": len(storm_stats.errors),
        "kv_blocks_used_after_storm": m2["thrifty_kv_blocks_used"],
        "seconds_to_idle_after_storm": round(storm_idle, 2),
        "rss_after_storm_mib": storm_rss and round(storm_rss, 1),
    }


def markdown(r: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in r.items() if k != "error_samples")
    return f"# thrifty serve load test\n\n| measure | value |\n| --- | --- |\n{rows}\n"


if __name__ == "__main__":
    main()
