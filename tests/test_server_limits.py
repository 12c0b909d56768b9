"""The server under pressure, on a deliberately small engine: 2 running sequences, 11 usable
KV blocks (176 tokens in all), 16-token prefill chunks and room for 1 queued request. Shows the
429 of a full queue, preemption that recomputes instead of dropping, and chunked prefill that
keeps a running stream flowing while a long prompt is prefilled.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator

import httpx2 as httpx
import openai
import pytest
from test_server import MODEL, launch, scrape, wait_idle

pytestmark = pytest.mark.slow

COUNTING = "1, 2, 3, 4, 5,"


SERVER: list = []  # the server's Popen, for the shutdown test


@pytest.fixture(scope="module")
def url(smollm2_gguf) -> Iterator[str]:
    args = ["--num-threads", "1", "--max-num-seqs", "2", "--num-kv-blocks", "12"]
    args += ["--max-num-batched-tokens", "16", "--max-queued-requests", "1"]
    with launch(*args, procs=SERVER) as url:
        yield url


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def stream(client, max_tokens: int = 150, prompt: str = COUNTING):
    return client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
    )


def test_full_queue_gets_429(url, client):
    running = []
    for _ in range(2):  # both take a running slot (max_num_seqs is 2)
        running.append(stream(client))
        next(running[-1])
    queued = stream(client)  # waits for a slot: the one queued request allowed
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
    for s in [*running, queued]:
        s.close()
    wait_idle(url)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=1).choices


def test_preempted_sequences_are_recomputed_not_dropped(url, client):
    # Two sequences of 11 + 100 tokens need 14 blocks; 11 exist: one is preempted, then resumed.
    solo = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=100, temperature=0)
    before = scrape(url)["thrifty_num_preemptions"]
    results: list[tuple[str, str | None, int]] = []

    def run(started: threading.Event) -> None:
        text, reason, tokens = [], None, 0
        for c in client.completions.create(
            model=MODEL, prompt=COUNTING, max_tokens=100, temperature=0, stream=True,
            stream_options={"include_usage": True},
        ):  # fmt: skip
            started.set()
            if c.choices:
                text.append(c.choices[0].text)
                reason = c.choices[0].finish_reason or reason
            if c.usage:
                tokens = c.usage.completion_tokens
        results.append(("".join(text), reason, tokens))

    threads = []
    for _ in range(2):
        started = threading.Event()
        threads.append(threading.Thread(target=run, args=(started,)))
        threads[-1].start()
        assert started.wait(60)  # its first token: no longer queued (the queue holds one)
    for t in threads:
        t.join()
    assert scrape(url)["thrifty_num_preemptions"] > before
    assert results == [(solo.choices[0].text, "length", 100)] * 2
    wait_idle(url)


def test_chunked_prefill_keeps_streams_flowing(url, client):
    arrivals: list[float] = []
    running = stream(client, max_tokens=30)
    next(running)

    def drain() -> None:
        for _ in running:
            arrivals.append(time.perf_counter())

    reader = threading.Thread(target=drain)
    reader.start()
    long_prompt = "Tell me about the sea. " * 18  # ~110 tokens: 7 chunks of 16
    sent = time.perf_counter()
    first = None
    for c in stream(client, max_tokens=2, prompt=long_prompt):
        if first is None and c.choices[0].text:
            first = time.perf_counter()
    reader.join()
    during = [t for t in arrivals if sent < t < first]
    assert len(during) >= 4, (len(during), len(arrivals))
    wait_idle(url)


def test_ctrl_c_ends_open_streams_and_exits_cleanly(url):
    """Last in this module: it stops the server."""
    body = {"prompt": COUNTING, "max_tokens": 150, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        SERVER[0].send_signal(signal.SIGINT)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2].removeprefix("data: "))["error"]["type"] == "server_error"
    assert SERVER[0].wait(timeout=30) == 130  # the CLI's exit code for Ctrl-C
    assert b"Traceback" not in b"".join(SERVER[0].log)
