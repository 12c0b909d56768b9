"""The reasoning parser on scripted outputs, and chat_template_kwargs reaching the template.

SmolLM2 does not think, so thinking models' outputs are scripted here: the tag in the output, the
tag opened by the template, no closing tag, and every output streamed one character at a time
(and in every two-piece split) must give the same split as the whole text at once. The same
scripted outputs then go through the server's response code as engine steps, whole and streamed.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from thrifty import SamplingParams, hub
from thrifty.engine.llm_engine import StepOutput
from thrifty.server.async_engine import AsyncEngine, Finished
from thrifty.server.config import ServerConfig
from thrifty.server.generation import Choice, Generation
from thrifty.server.metrics import Metrics
from thrifty.server.protocol import ApiError, ChatCompletionRequest
from thrifty.server.reasoning import ReasoningParser, prompt_opens_reasoning, split_reasoning
from thrifty.server.responses import Responses
from thrifty.server.serving import Serving, render_chat
from thrifty.tokenizer import Tokenizer

CASES = [
    # (output, template opened <think>, expected reasoning, expected content)
    ("<think>\nLet me add: 2+2=4.\n</think>\n\nThe answer is 4.", False,
     "Let me add: 2+2=4.\n", "The answer is 4."),
    ("Let me add: 2+2=4.\n</think>\n\nThe answer is 4.", True,
     "Let me add: 2+2=4.\n", "The answer is 4."),
    ("<think>I ran out of budget while thinking about </thi", False,
     "I ran out of budget while thinking about </thi", ""),
    ("Still thinking, no closing tag", True, "Still thinking, no closing tag", ""),
    ("Plain answer, no thinking at all.", False, None, "Plain answer, no thinking at all."),
    ("<thinking is not the tag", False, None, "<thinking is not the tag"),
    ("  <think></think>Empty thoughts.", False, "", "Empty thoughts."),
    ("x < y and </think> here", False, None, "x < y and </think> here"),
    ("<think>a</think>b</think>c", False, "a", "b</think>c"),
    ("\n\n</think>\n\nQwen3 with thinking switched off", True, "",
     "Qwen3 with thinking switched off"),
    ("<", False, None, "<"),
    ("", True, "", ""),
]  # fmt: skip


def stream(pieces: list[str], opened: bool) -> tuple[str | None, str]:
    parser = ReasoningParser(opened)
    reasoning, content = [], []
    for piece in pieces:
        r, c = parser.feed(piece)
        reasoning.append(r)
        content.append(c)
    r, c = parser.finish()
    return ("".join(reasoning) + r if parser.opened else None), "".join(content) + c


@pytest.mark.parametrize(("text", "opened", "reasoning", "content"), CASES)
def test_split_whole_and_streamed(text, opened, reasoning, content):
    assert split_reasoning(text, opened) == (reasoning, content)
    assert stream(list(text), opened) == (reasoning, content)  # one character at a time
    for i in range(len(text) + 1):
        assert stream([text[:i], text[i:]], opened) == (reasoning, content), i


def test_deltas_never_leak_a_partial_tag():
    parser = ReasoningParser(in_reasoning=True)
    assert parser.feed("thinking </th") == ("thinking ", "")
    assert parser.feed("ink>answer") == ("", "answer")
    parser = ReasoningParser()
    assert parser.feed("<thi") == ("", "")
    assert parser.feed("nk>deep") == ("deep", "")


# A Qwen3-like template: `enable_thinking=False` writes an empty, closed think block.
QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
# A DeepSeek-R1-like template: the generation prompt opens the think block itself.
R1_LIKE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)


def tokenizer_with(template: str) -> Tokenizer:
    base = Tokenizer.from_dir(hub.resolve("smollm2-135m-instruct", progress=False))
    return Tokenizer(base._tok, {"chat_template": template}, base.eos_token_ids)


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "SECRET THOUGHTS"},
                {"role": "user", "content": "and 3+3?"},
            ],
            **kw,
        }
    )


def test_chat_template_kwargs_reach_the_template():
    tok = tokenizer_with(QWEN3_LIKE)
    on = render_chat(tok, chat())
    off = render_chat(tok, chat(chat_template_kwargs={"enable_thinking": False}))
    assert off == on + "<think>\n\n</think>\n\n"
    assert not prompt_opens_reasoning(on) and not prompt_opens_reasoning(off)
    opened = render_chat(tokenizer_with(R1_LIKE), chat())
    assert prompt_opens_reasoning(opened)


def test_reasoning_content_is_not_fed_back():
    prompt = render_chat(tokenizer_with(QWEN3_LIKE), chat())
    assert "SECRET" not in prompt and "<|im_start|>assistant\n4<|im_end|>" in prompt


def test_reserved_template_kwargs_are_refused():
    with pytest.raises(ApiError) as e:
        render_chat(tokenizer_with(QWEN3_LIKE), chat(chat_template_kwargs={"messages": []}))
    assert e.value.status == 400 and e.value.param == "chat_template_kwargs"


# -- through the server's response code: scripted engine outputs, streamed and whole -----------


@pytest.fixture(scope="module")
def serving(smollm2_fp32):
    engine = smollm2_fp32.engine
    config = ServerConfig("thinker")
    serving = Serving(
        AsyncEngine(engine),
        engine.tokenizer,
        engine.max_model_len,
        config,
        Metrics(engine),
        engine.grammars,
    )
    return serving, Responses(engine.tokenizer, config.model_name)


def scripted(serving: Serving, pieces: list[str], opened: bool) -> Generation:
    """A generation whose engine output is `pieces`, one step each, then finished."""
    gen = Generation(serving, [[1, 2, 3]], [SamplingParams(max_tokens=64)], "chatcmpl")
    gen.choices = [Choice(0, ReasoningParser(opened))]
    rid = gen.rids[0]
    for i, piece in enumerate(pieces):
        reason = "stop" if i == len(pieces) - 1 else None
        gen.queue.put_nowait(StepOutput(rid, 0, piece, [i], [], reason))
    gen.queue.put_nowait(Finished(rid, 3, 0))
    return gen


async def events(stream) -> list[dict]:
    out = [line async for line in stream]
    assert out[-1] == "data: [DONE]\n\n"
    return [json.loads(e.removeprefix("data: ")) for e in out[:-1]]


@pytest.mark.parametrize(("text", "opened", "reasoning", "content"), CASES[:5])
def test_responses_split_reasoning(serving, text, opened, reasoning, content):
    serving, responses = serving
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]  # tags split across steps
    full = asyncio.run(responses.chat_full(scripted(serving, pieces, opened), False))
    message = full["choices"][0]["message"]
    assert message.get("reasoning_content") == reasoning and message["content"] == content
    chunks = asyncio.run(
        events(responses.chat_stream(scripted(serving, pieces, opened), False, True))
    )
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    streamed_r = "".join(d.get("reasoning_content", "") for d in deltas)
    streamed_c = "".join(d.get("content") or "" for d in deltas)
    assert (streamed_r, streamed_c) == (reasoning or "", content)
    assert not any("think>" in d.get("content", "") for d in deltas if reasoning is not None)
    assert chunks[-1]["usage"]["completion_tokens"] == len(pieces)
