"""Hostile requests against a real server (issue 18, items 1, 3, 4 and 7): each is the request
that once starved other clients, froze the event loop or ran from another web origin, and each
now gets a clear error or runs without hurting anyone else."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_server import MODEL, launch, wait_idle  # noqa: E402

pytestmark = pytest.mark.slow

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def url(smollm2_gguf):
    args = ["--num-threads", "1", "--max-model-len", "1024", "--max-n", "8"]
    args += ["--allowed-origins", "http://good.example"]
    with launch(*args) as url:
        yield url
        wait_idle(url)


def post(url: str, body: dict, path: str = "/v1/completions", **kw) -> httpx.Response:
    headers = {**JSON, **kw.pop("headers", {})}
    kw.setdefault("timeout", 60)
    return httpx.post(f"{url}{path}", json=body, headers=headers, **kw)


def health_time(url: str) -> float:
    start = time.perf_counter()
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    return time.perf_counter() - start


def test_prompts_times_n_count_against_the_limits(url):
    """2,000 prompts in a 22 KB body once starved every other client for two minutes."""
    r = post(url, {"prompt": ["hi"] * 2000, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "2000 prompts" in r.json()["error"]["message"]
    r = post(url, {"prompt": ["hi"] * 4, "n": 3, "max_tokens": 1})  # 12 completions > 8
    assert r.status_code == 400 and "--max-n" in r.json()["error"]["message"]
    r = post(url, {"prompt": ["hi"] * 4, "n": 2, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 8


def test_slow_prompts_do_not_block_the_event_loop(url):
    """Three 3.9 MB prompts once stalled /health for 6.6 s: tokenizing runs off the loop."""
    baseline = min(health_time(url) for _ in range(3))
    big = "hello world " * 320_000  # 3.8 MB: tokenized, then refused for its length
    results = []

    def send() -> None:
        results.append(post(url, {"prompt": big, "max_tokens": 1}, timeout=120).status_code)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    slowest = max(health_time(url) for _ in range(5))
    for t in threads:
        t.join()
    assert results == [400, 400, 400]
    assert slowest < max(0.5, 20 * baseline), (slowest, baseline)


def test_stop_strings_are_bounded(url):
    r = post(url, {"prompt": "hi", "max_tokens": 2, "stop": ["x" * 200_000] * 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    r = post(url, {"prompt": "hi", "max_tokens": 2, "stop": ["a"] * 17})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    r = post(url, {"prompt": "1, 2, 3,", "max_tokens": 4, "stop": ["y" * 1024] * 16})
    assert r.status_code == 200


def test_cross_site_requests_are_refused(url):
    """A text/plain POST needs no preflight, so any web page could once make the server run."""
    plain = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
    r = httpx.post(f"{url}/v1/completions", content='{"prompt": "hi"}', headers=plain)
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", content='{"prompt": "hi", "max_tokens": 1}')
    assert r.status_code == 415  # no Content-Type at all
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, authorization"}  # fmt: skip
    ok = httpx.options(f"{url}/v1/chat/completions",
                       headers={**preflight, "Origin": "http://good.example"})  # fmt: skip
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "http://good.example"
    bad = httpx.options(f"{url}/v1/chat/completions",
                        headers={**preflight, "Origin": "http://evil.example"})  # fmt: skip
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    r = post(url, {"prompt": "hi", "max_tokens": 1}, headers={"Origin": "http://good.example"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://good.example"
    r = post(url, {"prompt": "hi", "max_tokens": 1}, headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers  # the browser will not show it


def test_a_template_that_never_ends_is_stopped(tmp_path, smollm2_fp32):
    """A chat template is code from the checkpoint: one that loops for ever once froze the
    server. Rendering now has a deadline and an output limit."""
    from thrifty.errors import ThriftyError
    from thrifty.tokenizer import Tokenizer

    tok = smollm2_fp32.tokenizer
    forever = (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
        "{% endfor %}{% endfor %}{% endfor %}"
    )
    huge = "{{ 'x' * 1000000000 }}"
    for template in (forever, huge):
        bad = Tokenizer(tok._tok, {"chat_template": template}, tok.eos_token_ids)
        start = time.perf_counter()
        with pytest.raises(ThriftyError, match="chat template"):
            bad.apply_chat_template([{"role": "user", "content": "hi"}])
        assert time.perf_counter() - start < 15
    assert MODEL  # the server above is untouched by any of this


def test_partial_stop_matching_agrees_with_the_plain_scan():
    """The held-back tail of a stream (a suffix that may still grow into a stop string) is
    found with rfind jumps; the plain scan over every prefix length is the reference."""
    import random

    from thrifty.engine.sequence import _partial_stop_len

    def reference(text: str, stops: tuple[str, ...]) -> int:
        best = 0
        for s in stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 8)))
        stops = tuple(
            "".join(rng.choice("abc") for _ in range(rng.randint(1, 6)))
            for _ in range(rng.randint(1, 3))
        )
        assert _partial_stop_len(text, stops) == reference(text, stops), (text, stops)
