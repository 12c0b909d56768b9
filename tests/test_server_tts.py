"""Test-time scaling and the thinking budget through the server: the real `openai` client, a real
server process, the real SmolLM2.

SmolLM2 does not think, so the server here serves a copy of it whose tokenizer renames two of its
special tokens `<think>` and `</think>` (ordinary tokens now, so they show in the text), with a
chat template that opens the think block when asked (`chat_template_kwargs: {"thinking": true}`).
`<think>` is `<filename>`, after which SmolLM2 goes on writing (after most of the others it just
stops); the model never writes `</think>` itself: every close seen is the budget's.
"""

from __future__ import annotations

import asyncio
import json
import threading
import typing
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx2 as httpx
import openai
import pytest
from test_server import KEY, openai_client, suite_server, wait_idle
from test_tts_strategies import ID, FakeEngine, answers, trace

from thrifty import hub
from thrifty.errors import ThriftyError
from thrifty.server.async_engine import AsyncEngine, EngineThread
from thrifty.server.config import ServerConfig
from thrifty.server.metrics import Metrics
from thrifty.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ScalingOptions,
)
from thrifty.server.responses import Responses
from thrifty.server.scaling import scaling_config
from thrifty.server.serving import Serving
from thrifty.tokenizer import Tokenizer
from thrifty.tts import STRATEGIES, TTSConfig
from thrifty.tts.voting import STOPPING_RULES

MODEL = "smollm2-thinking"
SUM = [{"role": "user", "content": "What is 2 + 3? Answer with just the number."}]
SEA = [{"role": "user", "content": "Describe the sea in a few sentences."}]
THINK = {"chat_template_kwargs": {"thinking": True}}


def thinking_copy(src: Path, dest: Path) -> Path:
    """SmolLM2 with `<think>`/`</think>` as single tokens and a template that can open one."""
    dest.mkdir()
    # The converted directory's marker names the GGUF its weights are read from.
    for name in ("config.json", "generation_config.json", hub.CONVERTED_MARKER):
        (dest / name).symlink_to(src / name)
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    added = tok["added_tokens"]
    for entry, new in ((added[6], "<think>"), (added[14], "</think>")):
        del vocab[entry["content"]]
        vocab[new] = entry["id"]
        entry.update(content=new, special=False)
    (dest / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] += (
        "{% if add_generation_prompt and thinking is defined and thinking %}"
        "{{ '<think>\n' }}{% endif %}"
    )
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def model_dir(smollm2_gguf, tmp_path_factory) -> Path:
    src = hub.resolve("smollm2-135m-instruct", progress=False)
    return thinking_copy(src, tmp_path_factory.mktemp("models") / MODEL)


@pytest.fixture(scope="module")
def url(model_dir) -> Iterator[str]:
    with suite_server(str(model_dir)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai_client(url)


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.mark.slow
def test_self_consistency_answers_with_the_vote(url, client):
    tts = {"strategy": "self-consistency", "n": 4, "max_tokens": 12, "seed": 0}
    r = client.chat.completions.create(
        model=MODEL, messages=SUM, extra_body={"test_time_scaling": tts}
    )
    info = r.model_extra["test_time_scaling"]
    samples = info["samples"]
    assert info["strategy"] == "self-consistency" and info["num_samples"] == len(samples) == 4
    # Every sample that stated an answer voted once; the winner leads.
    voters = [s for s in samples if s["answer"] is not None]
    assert voters and sum(info["votes"].values()) == len(voters)
    assert info["answer"] == max(info["votes"], key=info["votes"].get)
    # The one choice is a sample that gave the chosen answer; usage counts every sample.
    assert len(r.choices) == 1
    content = r.choices[0].message.content
    assert any(s["text"] == content and s["answer"] == info["answer"] for s in samples)
    assert r.usage.completion_tokens == info["tokens"] == sum(s["tokens"] for s in samples)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert all(s["tokens"] <= 12 for s in samples)
    wait_idle(url)


@pytest.mark.slow
def test_other_strategies_streamed_and_as_completions(url, client):
    # deepconf, streamed: the role, then the whole answer in one chunk, then the usage.
    tts = {"strategy": "deepconf", "n": 4, "warmup": 2, "max_tokens": 8, "seed": 1}
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=SUM, stream=True, stream_options={"include_usage": True},
            extra_body={"test_time_scaling": tts},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(body) == 1 and len(chunks) == 3
    info = body[0].model_extra["test_time_scaling"]
    assert info["strategy"] == "deepconf" and info["threshold"] is not None
    assert info["num_samples"] == 4 and chunks[-1].usage.completion_tokens == info["tokens"]

    # adaptive and best-of-n on /v1/completions
    for strategy in ("adaptive", "best-of-n"):
        tts = {"strategy": strategy, "n": 4, "max_tokens": 8, "seed": 2}
        r = client.completions.create(
            model=MODEL, prompt="2 + 3 =", extra_body={"test_time_scaling": tts}
        )
        info = r.model_extra["test_time_scaling"]
        assert info["strategy"] == strategy and 1 <= info["num_samples"] <= 4
        assert r.choices[0].text in [s["text"] for s in info["samples"]]
        assert r.usage.completion_tokens == info["tokens"]
    wait_idle(url)


@pytest.mark.slow
def test_thinking_budget_is_respected_to_the_token(url, client, tokenizer):
    k = 6
    close = [tokenizer.encode("</think>", add_special_tokens=False)[0]]
    close += tokenizer.encode("\n\nThe answer is", add_special_tokens=False)

    def ask(**kw):
        return client.chat.completions.create(
            model=MODEL, messages=SEA, temperature=0, logprobs=True, extra_body={**THINK, **kw}
        )

    free = ask(max_tokens=k + 4)
    free_tokens = [e.token for e in free.choices[0].logprobs.content]
    assert free.choices[0].message.content == ""  # the model never closes the block itself
    assert free.choices[0].message.reasoning_content

    capped = ask(max_tokens=k + len(close) + 4, max_thinking_tokens=k)
    c = capped.choices[0]
    tokens = [e.token for e in c.logprobs.content]  # sampled tokens; injected ones have none
    assert tokens[:k] == free_tokens[:k]
    assert capped.usage.completion_tokens == len(tokens) + len(close)
    assert c.message.reasoning_content == "".join(tokens[:k]).lstrip()
    assert c.message.content.startswith("The answer is")

    # Streamed, the deltas split the same way.
    chunks = client.chat.completions.create(
        model=MODEL, messages=SEA, temperature=0, max_tokens=k + len(close) + 4, stream=True,
        extra_body={**THINK, "max_thinking_tokens": k},
    )  # fmt: skip
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning == c.message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == c.message.content

    # With test-time scaling, each sample is capped the same way.
    tts = {"strategy": "self-consistency", "n": 2, "max_tokens": k + len(close) + 4, "seed": 0}
    r = client.chat.completions.create(
        model=MODEL, messages=SEA, extra_body={**THINK, "max_thinking_tokens": k,
                                               "test_time_scaling": tts},
    )  # fmt: skip
    assert r.choices[0].message.content.startswith("The answer is")
    assert all("</think>" in s["text"] for s in r.model_extra["test_time_scaling"]["samples"])
    wait_idle(url)


def _post(url: str, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}"}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60)


@pytest.mark.slow
def test_bad_values_get_openai_errors(url, client):
    def chat(**kw):
        return {"messages": SUM, "max_tokens": 4, **kw}

    def sc(**kw):
        return {"test_time_scaling": {"strategy": "self-consistency", "n": 2, **kw}}

    cases = [
        (chat(test_time_scaling={"strategy": "majority"}), 400, "test_time_scaling.strategy"),
        (chat(test_time_scaling="self-consistency"), 400, "test_time_scaling"),
        (chat(**sc(n="4")), 400, "test_time_scaling.n"),
        (chat(**sc(bogus=1)), 400, "test_time_scaling.bogus"),
        (chat(**sc(n=9)), 400, "test_time_scaling.n"),
        (chat(**sc(n=0)), 400, "test_time_scaling"),
        (chat(**sc(confidence=1.5)), 400, "test_time_scaling"),
        (chat(**sc(max_tokens=10**6)), 400, "max_tokens"),
        (chat(n=2, **sc()), 400, "n"),
        (chat(stop=["."], **sc()), 400, "stop"),
        (chat(logprobs=True, **sc()), 400, "logprobs"),
        (chat(max_thinking_tokens=-1), 400, "max_thinking_tokens"),
        (chat(max_thinking_tokens="5"), 400, "max_thinking_tokens"),
        (chat(max_thinking_tokens=2, min_thinking_tokens=3), 400, "min_thinking_tokens"),
        (chat(**sc(max_thinking_tokens=-2)), 400, "test_time_scaling.max_thinking_tokens"),
    ]
    for body, status, param in cases:
        r = _post(url, body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param, (body, error)
    r = _post(url, {"prompt": ["a", "b"], **sc()}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    # Through the client: the same errors as exceptions.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=SUM, extra_body={"test_time_scaling": {"n": 100}}
        )
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=1).choices
    wait_idle(url)


@pytest.mark.slow
def test_disconnects_abort_every_sample(url, client):
    tts = {"strategy": "self-consistency", "n": 8, "max_tokens": 400, "seed": 3}
    body = {"prompt": "1, 2, 3, 4, 5,", "test_time_scaling": tts}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up on a full answer
        httpx.post(
            f"{url}/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=1.0,
        )
    wait_idle(url, timeout=3)
    stream = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4, 5,", stream=True, extra_body={"test_time_scaling": tts}
    )
    chat = client.chat.completions.create(
        model=MODEL, messages=SUM, stream=True, extra_body={"test_time_scaling": tts}
    )
    assert next(chat).choices[0].delta.role == "assistant"
    stream.close()  # one leaves before the first byte, the other after the role
    chat.close()
    wait_idle(url, timeout=3)


# -- without a server --------------------------------------------------------------------------


def test_scaling_options_are_the_tts_config_fields():
    fields = set(TTSConfig.__dataclass_fields__) - {"scorer"}
    assert set(ScalingOptions.model_fields) == fields
    assert ScalingOptions.model_fields["strategy"].annotation.__args__ == STRATEGIES
    rule = ScalingOptions.model_fields["stopping_rule"].annotation  # Literal[...] | None
    assert typing.get_args(typing.get_args(rule)[0]) == STOPPING_RULES


def test_scaling_config_takes_the_request_fields_it_can():
    def config(**kw):
        return scaling_config(ChatCompletionRequest.model_validate({"messages": SUM, **kw}), 8, 100)

    c = config(temperature=0.2, seed=-1, test_time_scaling={"strategy": "deepconf", "n": 4})
    assert (c.strategy, c.n, c.temperature, c.warmup) == ("deepconf", 4, 0.2, 3)
    assert c.seed == -1 % 2**40 and c.max_tokens == 100  # the context's room, under 512
    c = config(temperature=0.2, max_tokens=50, test_time_scaling={"temperature": 0.9})
    assert (c.temperature, c.max_tokens, c.n, c.top_p) == (0.9, 50, 8, TTSConfig.top_p)
    assert config(test_time_scaling={}).temperature == TTSConfig.temperature
    paper = {"strategy": "deepconf", "deepconf_stop": "consensus", "stopping_rule": "beta"}
    c = config(test_time_scaling={**paper, "numeric": True})
    assert (c.deepconf_stop, c.stopping_rule, c.numeric) == ("consensus", "beta", True)
    assert not config(test_time_scaling={}).numeric
    # consensus: null draws all n traces; left out, it is TTSConfig's share
    assert config(test_time_scaling={"strategy": "deepconf", "consensus": None}).consensus is None
    assert config(test_time_scaling={"strategy": "deepconf"}).consensus == TTSConfig.consensus
    assert config(test_time_scaling={"n": None}).n == TTSConfig.n
    assert (TTSConfig.deepconf_stop, TTSConfig.stopping_rule) == ("adaptive", "predictive")
    with pytest.raises(ApiError) as e:
        config(presence_penalty=0.5, test_time_scaling={})
    assert e.value.status == 400 and e.value.param == "presence_penalty"
    # A vote over free answers cannot keep a grammar or call tools: refused, not ignored.
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    tool = {"type": "function", "function": {"name": "f"}}
    for field, value in [("response_format", fmt), ("tools", [tool]), ("logit_bias", {"1": 5})]:
        with pytest.raises(ApiError) as e:
            config(**{field: value}, test_time_scaling={})
        assert e.value.status == 400 and e.value.param == field
    assert config(response_format={"type": "text"}, logit_bias={}, test_time_scaling={}).n


def test_a_budget_needs_a_thinking_model():
    tok = Tokenizer.from_dir(hub.resolve("smollm2-135m-instruct", progress=False))
    serving = Serving(SimpleNamespace(alive=True), tok, 1024, ServerConfig("smollm2"), None)
    assert not serving.thinks
    for field in ("max_thinking_tokens", "min_thinking_tokens"):
        req = ChatCompletionRequest.model_validate({"messages": SUM, field: 4})
        with pytest.raises(ApiError) as e:
            serving.chat(req)
        assert e.value.status == 400 and e.value.param == field
        assert "thinking model" in e.value.message


# -- the engine loop on a scripted engine (test_tts_strategies.FakeEngine) ---------------------


def scripted_serving(
    scripts=None, *, engine: FakeEngine | None = None, thread: EngineThread | None = None
) -> tuple[FakeEngine, Serving, Responses]:
    """A Serving on FakeEngine(scripts), or on `engine`; its loop on `thread` (else a new one)."""
    engine = engine or FakeEngine(scripts)
    config = ServerConfig("fake", max_n=8)
    serving = Serving(AsyncEngine(engine, thread), engine.tokenizer, 1024, config, Metrics(engine))
    return engine, serving, Responses(engine.tokenizer, "fake")


def in_loop(serving: Serving, work):
    """Run `work()` with the serving's engine loop started (30 s at most), then stop the loop."""

    async def main():
        serving.engine.start()
        try:
            return await asyncio.wait_for(work(), 30)
        finally:
            serving.engine.stop()

    return asyncio.run(main())


def vote_in_loop(serving: Serving, n: int) -> dict:
    """The response body of a self-consistency request of `n` samples on "Q1 x", run through
    the serving's engine loop."""
    req = CompletionRequest.model_validate(
        {"prompt": "Q1 x", "test_time_scaling": {"n": n, "seed": 0}}
    )

    async def work():
        run = serving.completion_scaling(req)
        run.start()
        return await run.full("fake")

    return in_loop(serving, work)


def test_jobs_run_in_the_engine_loop_and_vote():
    engine, serving, _ = scripted_serving({"Q1": answers("42", "7", "42", "9", "42")})
    body = vote_in_loop(serving, 5)
    info = body["test_time_scaling"]
    assert info["votes"] == {"42": 3.0, "7": 1.0, "9": 1.0} and info["answer"] == "42"
    assert body["choices"][0]["text"].split()[-2:] == ["42", "."]
    assert body["usage"]["completion_tokens"] == info["tokens"] == 5 * len(answers("42")[0])
    assert not engine.requests and engine.blocks.num_used_blocks == 0
    assert serving.num_queued == 0


def test_the_loop_steps_on_the_thread_that_loaded_the_engine():
    # `thrifty serve` loads the model on the loop's thread, so that OpenMP keeps one team of
    # workers (thrifty.server.async_engine): every step must run there, none on the caller's
    thread = EngineThread()
    loaded_on, engine = thread.call(
        lambda: (threading.get_ident(), FakeEngine({"Q1": answers("42", "7", "42")}))
    ).result()
    stepped_on = []
    step = engine.step
    engine.step = lambda: stepped_on.append(threading.get_ident()) or step()
    _, serving, _ = scripted_serving(engine=engine, thread=thread)
    assert vote_in_loop(serving, 3)["test_time_scaling"]["answer"] == "42"
    assert stepped_on and set(stepped_on) == {loaded_on} != {threading.get_ident()}
    # an error comes back to the caller, and the thread goes on taking calls
    with pytest.raises(ThriftyError, match="no such model"):
        thread.call(lambda: (_ for _ in ()).throw(ThriftyError("no such model"))).result()
    assert thread.call(threading.get_ident).result() == loaded_on


def test_an_aborted_job_frees_every_sample():
    endless = [[(ID["a"], 1.0)]]  # never ends before max_tokens
    engine, serving, _ = scripted_serving({"Q1": endless})
    req = CompletionRequest.model_validate(
        {"prompt": "Q1 x", "test_time_scaling": {"n": 8, "max_tokens": 1000}}
    )

    async def until(check):
        for _ in range(5000):
            if check():
                return
            await asyncio.sleep(0.001)
        raise AssertionError("timed out")

    async def work():
        run = serving.completion_scaling(req)
        run.start()
        await until(lambda: engine.blocks.num_used_blocks > 8)  # all eight are decoding
        run.abort()
        await until(lambda: engine.blocks.num_used_blocks == 0 and not engine.requests)
        return run

    run = in_loop(serving, work)
    assert run.queue.empty() and serving.num_queued == 0  # no answer: the job was dropped


def test_thinking_budget_through_the_response_code():
    script = trace("<think> a b c d e f g </think> so 7")
    engine, serving, responses = scripted_serving({"Q2": [script]})
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "Q2 x"}], "max_thinking_tokens": 3}
    )

    async def work():
        gen, parsers = serving.chat(req)
        gen.start(parsers)
        full = await responses.chat_full(gen, False)
        gen, parsers = serving.chat(req)
        gen.start(parsers)
        chunks = [c async for c in responses.chat_stream(gen, False, True)]
        return full, chunks

    full, chunks = in_loop(serving, work)
    message = full["choices"][0]["message"]
    assert message["reasoning_content"].split() == ["a", "b", "c"]
    assert message["content"].split()[:3] == ["The", "answer", "is"]
    deltas = [json.loads(c[6:])["choices"] for c in chunks[:-1]]
    deltas = [d[0]["delta"] for d in deltas if d]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]
    assert not engine.requests and engine.blocks.num_used_blocks == 0


def test_thinking_minimum_through_the_response_code():
    # The script closes after one word; a minimum of 3 swaps that close for "Wait".
    engine, serving, responses = scripted_serving({"Q3": [trace("<think> a </think> so 7")]})
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "Q3 x"}], "min_thinking_tokens": 3}
    )

    async def work():
        gen, parsers = serving.chat(req)
        gen.start(parsers)
        return await responses.chat_full(gen, False)

    message = in_loop(serving, work)["choices"][0]["message"]
    assert message["reasoning_content"].split() == ["a", "Wait", "so", "7"]
    assert message["content"] == ""
    assert not engine.requests and engine.blocks.num_used_blocks == 0
