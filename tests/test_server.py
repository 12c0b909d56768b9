"""`thrifty serve` end to end: a real server process on a free loopback port, the real SmolLM2,
and the real `openai` client (raw httpx only for what that client cannot send, e.g. bad bytes).

Expected texts are never written down: they come from greedy runs against the same server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from thrifty import hub
from thrifty.client import LOCAL_URL_ENV, local_server
from thrifty.server.metrics import unlabelled
from thrifty.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

KEY = "test-key-0123456789"
MODEL = "smollm2-135m-instruct"
CONTEXT = 1024
# Set by `pytest --tensor-parallel-size N` (tests/conftest.py); a conftest is not importable by
# name (tests/hostile has its own), so the variable is named here too.
TENSOR_PARALLEL_ENV = "THRIFTY_TEST_TENSOR_PARALLEL_SIZE"
# Greedy answers are compared across one process and 2 ranks (`make test` runs this file on
# both); "What is the capital of France?" opens on a near tie that 2 ranks' rounding can flip
# (tests/test_tensor_parallel.py: QUESTION), this question on none.
PARIS = [{"role": "user", "content": "Name the capital of France."}]
COUNT = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def launch(
    *args: str, env: dict[str, str] | None = None, procs: list | None = None, model: str = MODEL
) -> Iterator[str]:
    """Run `thrifty serve MODEL ARGS` on a free port; yield its base URL once /health answers.

    `procs`, if given, receives the server's Popen and its output lines (as `proc.log`). Under
    `pytest --tensor-parallel-size N` the server runs on N ranks unless ARGS say how many.
    """
    ranks = os.environ.get(TENSOR_PARALLEL_ENV)
    if ranks and "--tensor-parallel-size" not in args:
        args = (*args, "--tensor-parallel-size", ranks)
    port = free_port()
    cmd = [sys.executable, "-m", "thrifty", "serve", model, "--port", str(port), *args]
    proc = subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    log: list[bytes] = []
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
    proc.log = log
    if procs is not None:
        procs.append(proc)
    url = f"http://127.0.0.1:{port}"
    try:
        # Loading takes seconds; the first start after a kernel source changed also compiles it.
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {b''.join(log).decode(errors='replace')}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not up in 300 s: {b''.join(log).decode()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scrape(url: str) -> dict[str, float]:
    """The server's metrics without labels, by name."""
    return unlabelled(httpx.get(f"{url}/metrics").text)


def wait_idle(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Metrics once no sequence runs or waits and no KV block is held (or fail)."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        idle = m["thrifty_kv_blocks_used"] == 0 and m["thrifty_num_seqs_running"] == 0
        if idle and m["thrifty_num_seqs_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, f"server not idle: {m}"
        time.sleep(0.05)


@contextmanager
def suite_server(model: str = MODEL) -> Iterator[str]:
    """The server the server tests share: one thread, CONTEXT tokens, n <= 8, 128 MiB of KV
    cache, and the API key KEY."""
    with launch(
        "--num-threads", "1", "--max-model-len", str(CONTEXT), "--max-n", "8",
        "--kv-cache-memory-bytes", str(128 << 20),
        env={"THRIFTY_API_KEY": KEY}, model=model,
    ) as url:  # fmt: skip
        yield url


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def url(smollm2_gguf) -> Iterator[str]:
    with suite_server() as url:
        yield url


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai_client(url)


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf) -> Tokenizer:
    return Tokenizer.from_dir(hub.resolve(MODEL, progress=False))


def chat_tokens(tokenizer: Tokenizer, messages) -> int:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return len(tokenizer.encode(prompt, add_special_tokens=False))


def test_models_health_and_page(url, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and '<script src="/static/chat.js">' in page.text
    script = httpx.get(f"{url}/static/chat.js")
    assert script.status_code == 200 and "/v1/chat/completions" in script.text
    for vendored in ("marked.min.js", "purify.min.js"):  # the page works offline
        assert httpx.get(f"{url}/static/{vendored}").status_code == 200
    missing = httpx.get(f"{url}/static/index.py")
    assert missing.status_code == 404 and missing.json()["error"]["message"]


def test_chat_full_and_streamed_agree(client, tokenizer):
    full = client.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    assert "Paris" in text
    u = full.usage
    assert u.prompt_tokens == chat_tokens(tokenizer, PARIS)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 1 <= u.completion_tokens <= 12
    assert (u.completion_tokens == 12) == (full.choices[0].finish_reason == "length")

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=PARIS, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}, logprobs=True,
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.delta.content or "" for c in body) == text
    assert [c.finish_reason for c in body if c.finish_reason] == [full.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == u.completion_tokens
    # One logprob per generated token, spread over the chunks.
    assert sum(len(c.logprobs.content) for c in body if c.logprobs) == u.completion_tokens
    # The same prompt again: its full blocks come from the prefix cache.
    assert usage.prompt_tokens_details.cached_tokens == (u.prompt_tokens - 1) // 16 * 16


def _thrifty(
    *argv: str, env_added: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """The command line in a fresh interpreter (with `env_added`), failing if it imported
    torch."""
    code = (
        "import sys, thrifty.cli; rc = thrifty.cli.main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'imported torch'; sys.exit(rc)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("THRIFTY_URL", "THRIFTY_API_KEY")}
    env.update(env_added or {})
    cmd = [sys.executable, "-c", code, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, input=stdin)


def test_thrifty_run_through_the_server(url, client):
    # `thrifty run --url`: the running server answers, greedy text equal to the API's own, and
    # the client never imports torch or loads the model.
    ask = ["--url", url, "--api-key", KEY, "--temperature", "0", "--max-tokens", "24"]
    out = _thrifty("run", *ask, PARIS[0]["content"])
    assert out.returncode == 0, out.stderr
    want = (
        client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=24)
        .choices[0]
        .message.content
    )
    assert out.stdout.strip() == want.strip() and "Paris" in want
    # No prompt: a chat with that server, the same answer to the same first turn.
    chat = _thrifty("run", *ask, stdin=f"{PARIS[0]['content']}\n/bye\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.split(">>>")[1].strip() == want.strip() and f"with {MODEL}" in chat.stderr
    raw = _thrifty("run", *ask, MODEL, "The capital of France is", "--raw")
    assert raw.returncode == 0, raw.stderr
    want = (
        client.completions.create(
            model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=24
        )
        .choices[0]
        .text
    )
    assert raw.stdout.strip() == want.strip()
    # Refusals, one line each: another model, a flag for loading, a bad key, no server.
    for argv, message in [
        ((*ask, "qwen2.5-coder-0.5b-instruct", "hi"), f"serves {MODEL}, not qwen"),
        ((*ask, "hi", "--quantization", "fp8"), "--quantization applies where thrifty loads"),
        (("--url", url, "--api-key", "wrong", "hi"), "401"),
        (("--url", "http://127.0.0.1:1", "hi"), "no server at http://127.0.0.1:1"),
    ]:
        out = _thrifty("run", *argv)
        assert out.returncode == 1 and message in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_thrifty_run_answers_through_the_local_server(url, client, monkeypatch):
    # Without --url, `thrifty run` asks the thrifty serve on this machine ($THRIFTY_LOCAL_URL,
    # default serve's own address) when it has the model loaded: the API's greedy answer, and
    # no torch import.
    local = {"THRIFTY_LOCAL_URL": url, "THRIFTY_API_KEY": KEY}
    ask = ["--temperature", "0", "--max-tokens", "16"]
    out = _thrifty("run", *ask, PARIS[0]["content"], env_added=local)
    assert out.returncode == 0, out.stderr
    want = (
        client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=16)
        .choices[0]
        .message.content
    )
    assert out.stdout.strip() == want.strip()
    # So does a chat (`chat`, or `run` with no prompt): each turn with the conversation so far.
    turns = f"{PARIS[0]['content']}\nAnd of Italy?\n/model\n/bye\n"
    out = _thrifty("chat", *ask, env_added=local, stdin=turns)
    assert out.returncode == 0, out.stderr
    answers = [a.strip() for a in out.stdout.split(">>>")[1:3]]
    second = [*PARIS, {"role": "assistant", "content": answers[0]}]
    second.append({"role": "user", "content": "And of Italy?"})
    again = (
        client.chat.completions.create(model=MODEL, messages=second, temperature=0, max_tokens=16)
        .choices[0]
        .message.content
    )
    assert answers == [want.strip(), again.strip()] and f"at {url}" in out.stderr
    # Where that server cannot answer, run loads the model itself: another model, a key the
    # server refuses, no server there at all.
    monkeypatch.setenv(LOCAL_URL_ENV, url)
    assert local_server(MODEL, KEY).url == url
    assert local_server("qwen2.5-coder-0.5b-instruct", KEY) is None
    assert local_server(MODEL, "wrong") is None
    monkeypatch.setenv(LOCAL_URL_ENV, f"http://127.0.0.1:{free_port()}")
    assert local_server(MODEL, KEY) is None
    # --local loads it here even so (and so imports torch).
    out = _thrifty("run", *ask, "--local", "hi", env_added=local)
    assert out.returncode == 1 and "imported torch" in out.stderr, out.stderr


def test_run_keep_alive_leaves_a_server_that_later_runs_use_until_it_idles(smollm2_gguf):
    # `run --keep-alive`: with no server at $THRIFTY_LOCAL_URL, run starts `thrifty serve` there
    # in the background and answers through it (never importing torch itself); the next run
    # finds it and loads nothing; once DURATION passes without a request the server exits.
    url = f"http://127.0.0.1:{free_port()}"
    log = hub.home() / f"serve-{url.rsplit(':', 1)[1]}.log"
    local = {"THRIFTY_LOCAL_URL": url}
    ask = ["--temperature", "0", "--max-tokens", "16", PARIS[0]["content"]]
    try:
        first = _thrifty("run", "--keep-alive", "4s", *ask, env_added=local)
        assert first.returncode == 0, first.stderr
        assert f"starting a server for {MODEL} at {url}" in first.stderr, first.stderr
        want = (
            openai_client(url)
            .chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=16)
            .choices[0]
            .message.content
        )
        assert first.stdout.strip() == want.strip()
        second = _thrifty("run", *ask, env_added=local)
        assert second.returncode == 0 and "starting" not in second.stderr, second.stderr
        assert second.stdout == first.stdout
        deadline = time.monotonic() + 60
        while _up(url):
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        assert "no request for 4 s, stopping" in log.read_text()
    finally:  # a server left up by a failure above stops itself 4 s after its last request
        log.unlink(missing_ok=True)
    # A duration that is not one: one line, exit 1, before any server starts.
    out = _thrifty("run", "hi", env_added={**local, "THRIFTY_KEEP_ALIVE": "5 minutes"})
    assert out.returncode == 1 and "$THRIFTY_KEEP_ALIVE: expected a duration" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_completions_full_and_streamed(client, tokenizer):
    prompt = "The capital of France is"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert full.usage.completion_tokens == 8
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == full.choices[0].text
    # Token ids work as a prompt too, and several prompts in one request.
    ids = tokenizer.encode(prompt)
    both = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=8, temperature=0)
    assert [c.text for c in both.choices] == [full.choices[0].text] * 2
    assert both.usage.prompt_tokens == 2 * len(ids)


def test_n4_and_seeds_reproduce(client):
    def sample(seed: int):
        r = client.chat.completions.create(
            model=MODEL, messages=COUNT, n=4, max_tokens=8, temperature=1.0, seed=seed,
            logprobs=True,
        )  # fmt: skip
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
        # The four samples share the prompt's blocks: the prompt is counted once.
        assert r.usage.prompt_tokens == chat_tokens_count
        return [c.message.content for c in r.choices]

    r = client.chat.completions.create(model=MODEL, messages=COUNT, max_tokens=1)
    chat_tokens_count = r.usage.prompt_tokens
    first = sample(7)
    assert sample(7) == first
    assert len(sample(-(10**30))) == 4  # any integer is a seed
    assert len(set(first)) > 1  # four different samples
    assert sample(8) != first


def test_stop_strings(client):
    base = client.chat.completions.create(model=MODEL, messages=COUNT, max_tokens=30, temperature=0)
    text = base.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    want = text[: text.index(stop)]
    for stream in (False, True):
        r = client.chat.completions.create(
            model=MODEL, messages=COUNT, max_tokens=30, temperature=0, stop=[stop, "zzz"],
            stream=stream,
        )  # fmt: skip
        if stream:
            chunks = list(r)
            got = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            got, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert (got, reason) == (want, "stop")


def test_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=PARIS, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert bytes(entry.bytes).decode() == entry.token
    text = r.choices[0].message.content
    assert "".join(e.token for e in content).startswith(text)
    c = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, logprobs=2
    )
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset[0] == 0 and all(len(t) == 2 for t in lp.top_logprobs)


def test_reasoning_content_in_input_is_accepted(client):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
        {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert r.choices[0].message.content
    # SmolLM2 does not think: no reasoning field in the answer.
    assert getattr(r.choices[0].message, "reasoning_content", None) is None


def _post(url, body: bytes | str, key: str | None = KEY, path="/v1/chat/completions", **kw):
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{url}{path}", content=body, headers=headers, timeout=60)


def _check_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def _still_healthy(url, client):
    assert httpx.get(f"{url}/health").status_code == 200
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=1)
    assert r.usage.completion_tokens == 1


def test_bad_input_gets_the_right_error(url, client):
    msgs = '"messages": [{"role": "user", "content": "hi"}]'
    cases = [
        (_post(url, "{not json"), 400, None),
        (_post(url, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'), 400, None),
        (_post(url, '{"messages": "hi"}'), 400, "messages"),
        (_post(url, "{" + msgs + ', "temperature": "hot"}'), 400, "temperature"),
        (_post(url, "{" + msgs + ', "max_tokens": 1.5}'), 400, "max_tokens"),
        (_post(url, "{" + msgs + ', "tools": [{"type": "web_search"}]}'), 400, "tools.0.type"),
        (_post(url, "{" + msgs + ', "temprature": 0}'), 400, "temprature"),
        (_post(url, "[1, 2]"), 400, None),
        (_post(url, "{" + msgs + "}", key=None), 401, None),
        (_post(url, "{" + msgs + "}", key="wrong"), 401, None),
        (_post(url, "{" + msgs + ', "model": "/etc/passwd"}'), 404, "model"),
        (_post(url, "x" * (5 << 20)), 413, None),
        (httpx.get(f"{url}/v1/models"), 401, None),
        (httpx.get(f"{url}/v1/nope", headers={"Authorization": f"Bearer {KEY}"}), 404, None),
        (httpx.get(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}), 405, None),
    ]
    for response, status, param in cases:
        _check_error(response, status, param)
        _still_healthy(url, client)


def test_limits_through_the_client(url, client):
    long_prompt = [{"role": "user", "content": "hello " * CONTEXT}]
    bad = [
        (openai.BadRequestError, "messages", dict(messages=long_prompt, max_tokens=4)),
        (openai.BadRequestError, "max_tokens", dict(messages=PARIS, max_tokens=10**9)),
        (openai.BadRequestError, "n", dict(messages=PARIS, n=9, max_tokens=2)),
        (openai.BadRequestError, "top_p", dict(messages=PARIS, top_p=0)),
        (openai.NotFoundError, "model", dict(messages=PARIS, model="gpt-4o")),
        (openai.BadRequestError, "stop", dict(messages=PARIS, stop=["a"] * 17)),
    ]
    for error, param, kwargs in bad:
        kwargs.setdefault("model", MODEL)
        with pytest.raises(error) as e:
            client.chat.completions.create(**kwargs)
        assert e.value.body["param"] == param
        _still_healthy(url, client)
    wrong_key = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.chat.completions.create(model=MODEL, messages=PARIS)
    _still_healthy(url, client)


def test_metrics(url, client):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    m = scrape(url)
    for name in (
        "thrifty_prompt_tokens_total",
        "thrifty_generation_tokens_total",
        "thrifty_time_to_first_token_seconds_count",
        "thrifty_inter_token_latency_seconds_count",
        "thrifty_num_seqs_running",
        "thrifty_num_seqs_waiting",
        "thrifty_kv_blocks_used",
        "thrifty_prefix_cache_hit_rate",
    ):
        assert name in m, name
    assert m["thrifty_generation_tokens_total"] >= 2 and m["thrifty_kv_blocks_total"] > 0
    text = httpx.get(f"{url}/metrics").text
    assert 'thrifty_requests_total{route="/v1/completions",status="200"}' in text


def test_requests_join_a_running_batch_and_disconnects_free_blocks(url, client):
    counting = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=400, temperature=0, stream=True
    )
    first = [next(counting) for _ in range(3)]
    assert all(c.choices[0].finish_reason is None for c in first)
    # A second request is served while the first is still streaming: it joined the batch.
    short = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    assert short.usage.completion_tokens == 4
    assert next(counting).choices[0].finish_reason is None
    assert scrape(url)["thrifty_kv_blocks_used"] > 0
    counting.close()  # the client leaves mid-stream
    wait_idle(url, timeout=2)
    # A non-streamed request whose client gives up is aborted too (ignore_eos: it cannot end
    # before the client's timeout, however fast the machine).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{url}/v1/completions",
            json={"prompt": "1, 2, 3,", "max_tokens": 1000, "ignore_eos": True},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=0.5,
        )
    wait_idle(url, timeout=2)


def test_prefix_cache_500_token_system_prompt(client, tokenizer):
    def system(topic: str) -> str:
        rules = " ".join(
            f"Rule {i}: always answer questions about {topic} politely." for i in range(60)
        )
        ids = tokenizer.encode(rules, add_special_tokens=False)[:500]
        return tokenizer.decode(ids)

    def ask(sys_prompt: str, question: str) -> tuple[float, int]:
        messages = [
            {"role": "system", "content": sys_prompt},
            {"role": "user", "content": question},
        ]
        start = time.perf_counter()
        ttft = None
        for c in client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=2, temperature=0, stream=True,
            stream_options={"include_usage": True},
        ):  # fmt: skip
            if ttft is None and c.choices and c.choices[0].delta.content:
                ttft = time.perf_counter() - start
            usage = c.usage
        return ttft, usage.prompt_tokens_details.cached_tokens

    cold_ttft, cold_cached = ask(system("cats"), "Who are you?")
    warm_ttft, warm_cached = ask(system("cats"), "What do you do?")
    other_ttft, _ = ask(system("dogs"), "What do you do?")
    print(
        f"TTFT cold {cold_ttft:.3f}s, cached {warm_ttft:.3f}s ({warm_cached} tokens),"
        f" other system prompt {other_ttft:.3f}s"
    )
    assert cold_cached < 16 and warm_cached >= 480
    assert warm_ttft < cold_ttft and warm_ttft < other_ttft


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


# Records each text the page's answer number n (arguments[0]) shows, in window.thriftySeen.
WATCH_ANSWER = """
const n = arguments[0];
window.thriftySeen = [];
new MutationObserver(() => {
  const answer = document.querySelectorAll(".assistant .answer")[n];
  const seen = window.thriftySeen;
  if (answer && answer.textContent && seen[seen.length - 1] !== answer.textContent) {
    seen.push(answer.textContent);
  }
}).observe(document.body, {subtree: true, childList: true, characterData: true});
"""


def test_chat_page_in_headless_chromium(url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def find(css):
        return browser.find_element(By.CSS_SELECTOR, css)

    def until(check, timeout=180.0):  # generous: a busy 2-core machine streams slowly
        deadline = time.monotonic() + timeout
        while not (value := check()):
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.01)
        return value

    browser.get(f"{url}/")
    find("#key").send_keys(KEY, Keys.TAB)  # the key goes with every request
    until(lambda: find("#model").text == MODEL)

    def ask(question: str) -> list[str]:
        """Type a question, send it, and return the answer's text as seen while it streamed:
        each state the page gave it, recorded in the page by a MutationObserver (polling from
        here missed them once an 8-token answer streamed in under 40 ms)."""
        n = len(browser.find_elements(By.CSS_SELECTOR, ".assistant"))
        browser.execute_script(WATCH_ANSWER, n)
        find("#input").send_keys(question, Keys.ENTER)
        until(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".assistant")) > n)
        until(lambda: find("#send").is_enabled())
        return browser.execute_script("return window.thriftySeen")

    seen = ask("What is the capital of France?")  # sampled at the default temperature
    assert seen[-1].strip()
    assert len(set(seen)) >= 2, seen  # the answer grew in place: it streamed
    ask("And of Italy?")  # a second turn in the same conversation
    users = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".user")]
    assert users == ["What is the capital of France?", "And of Italy?"]
    assert len(browser.find_elements(By.CSS_SELECTOR, ".assistant .answer")) == 2

    def error() -> str:
        return " ".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, ".error"))

    # The stop button, in a new chat: the two sampled answers above may have filled the 1024-token
    # context, and then the second turn shows the server's context error instead of an answer.
    assert not error() or "context holds 1024" in error(), error()
    # A sampled story can, rarely, end before the click lands; then it is asked again.
    for _ in range(3):
        find("#reset").click()
        until(
            lambda: (
                find("#send").is_enabled() and not browser.find_elements(By.CSS_SELECTOR, ".msg")
            )
        )
        find("#input").send_keys("Write a very long story about the sea.", Keys.ENTER)
        answer = until(lambda: browser.find_elements(By.CSS_SELECTOR, ".assistant .answer"))[0]
        until(lambda a=answer: a.text or error() or find("#send").is_enabled())
        assert not error(), error()
        if find("#stop").is_enabled():
            find("#stop").click()
        until(lambda: find("#send").is_enabled())
        if "[stopped]" in answer.text:
            break
    assert "[stopped]" in answer.text, answer.text
    wait_idle(url)  # the stop button aborted the request on the server
    shot = Path(os.environ.get("THRIFTY_SCREENSHOT", tmp_path / "chat_page.png"))
    assert browser.save_screenshot(str(shot)), shot
