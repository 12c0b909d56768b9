"""Engine output -> OpenAI JSON: full responses, server-sent event streams, logprobs.

A stream ends with `data: [DONE]`; an error after the headers went out is sent as an event. However
a stream ends (finished, failed, or closed early because the client left), its engine requests are
aborted, which frees their sequences and KV blocks at once (a no-op for finished ones).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from thrifty.engine.sequence import TokenLogprob
from thrifty.server.generation import Choice, Generation
from thrifty.server.protocol import ApiError
from thrifty.tokenizer import Tokenizer


class Responses:
    def __init__(self, tokenizer: Tokenizer, model_name: str):
        self.tokenizer, self.model_name = tokenizer, model_name

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            s = self.token_str(token_id)
            return {"token": s, "logprob": _finite(logprob), "bytes": list(s.encode())}

        return {
            "content": [
                {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(*t) for t in lp.top]}
                for lp in lps
            ],
            "refusal": None,
        }

    def completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens = [self.token_str(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(lp.logprob) for lp in lps],
            "top_logprobs": [{self.token_str(t): _finite(v) for t, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }

    async def chat_full(self, gen: Generation, want_logprobs: bool) -> dict[str, Any]:
        async for choice, out in gen.outputs():
            take_text(choice, out.delta_text)
        for c in gen.choices:
            take_text(c, None)
        choices = []
        for c in gen.choices:
            text = "".join(c.text)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if c.parser is not None and c.parser.opened:
                message["reasoning_content"] = message["reasoning"] = "".join(c.reasoning)
            if c.calls:
                message["tool_calls"] = [call.openai() for call in c.calls]
                message["content"] = text if text.strip() else None
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": self.chat_logprobs(c.logprobs) if want_logprobs else None,
                    "finish_reason": finish_reason(c),
                }
            )
        return {
            "id": gen.id,
            "object": "chat.completion",
            "created": gen.created,
            "model": self.model_name,
            "choices": choices,
            "usage": gen.usage(),
        }

    def echo_text(self, gen: Generation, choice: Choice) -> str:
        """The prompt of a choice, for `echo`."""
        prompt = gen.prompts[choice.index // gen.params[0].n]
        return self.tokenizer.decode(prompt, skip_special_tokens=False)

    async def completion_full(
        self, gen: Generation, want_logprobs: bool, echo: bool = False
    ) -> dict[str, Any]:
        if echo:
            for c in gen.choices:
                c.text.append(self.echo_text(gen, c))
        async for choice, out in gen.outputs():
            choice.text.append(out.delta_text)
        return {
            "id": gen.id,
            "object": "text_completion",
            "created": gen.created,
            "model": self.model_name,
            "choices": [
                {
                    "index": c.index,
                    "text": "".join(c.text),
                    "logprobs": self.completion_logprobs(c.logprobs, 0) if want_logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for c in gen.choices
            ],
            "usage": gen.usage(),
        }

    def chat_stream(
        self, gen: Generation, want_logprobs: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        def delta(c: Choice, d: dict[str, Any], logprobs=None, finish=None) -> dict[str, Any]:
            return {"index": c.index, "delta": d, "logprobs": logprobs, "finish_reason": finish}

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            for c in gen.choices:
                yield {"choices": [delta(c, {"role": "assistant", "content": ""})]}
            async for c, out in gen.outputs():
                first_call = len(c.calls)
                r, t = take_text(c, out.delta_text)
                if out.finish_reason is not None:
                    r2, t2 = take_text(c, None)
                    r, t = r + r2, t + t2
                d: dict[str, Any] = {"reasoning_content": r, "reasoning": r} if r else {}
                if t:
                    d["content"] = t
                if len(c.calls) > first_call:  # each call whole, as one delta
                    d["tool_calls"] = [
                        {"index": i, **call.openai()}
                        for i, call in enumerate(c.calls[first_call:], first_call)
                    ]
                lps = self.chat_logprobs(out.logprobs) if want_logprobs and out.logprobs else None
                finish = finish_reason(c) if out.finish_reason is not None else None
                if d or lps or finish:
                    yield {"choices": [delta(c, d, lps, finish)]}

        head = self._head(gen, "chat.completion.chunk")
        return event_stream(chunks(), head, include_usage, gen.usage, gen.abort)

    def completion_stream(
        self, gen: Generation, want_logprobs: bool, include_usage: bool, echo: bool = False
    ) -> AsyncIterator[str]:
        async def chunks() -> AsyncIterator[dict[str, Any]]:
            offsets = [0] * len(gen.choices)
            for c in gen.choices if echo else []:
                text = self.echo_text(gen, c)
                offsets[c.index] = len(text)
                yield {"choices": [{"index": c.index, "text": text, "logprobs": None,
                                    "finish_reason": None}]}  # fmt: skip
            async for c, out in gen.outputs():
                lps = None
                if want_logprobs and out.logprobs:
                    lps = self.completion_logprobs(out.logprobs, offsets[c.index])
                offsets[c.index] += len(out.delta_text)
                if out.delta_text or lps or out.finish_reason:
                    choice = {
                        "index": c.index,
                        "text": out.delta_text,
                        "logprobs": lps,
                        "finish_reason": out.finish_reason,
                    }
                    yield {"choices": [choice]}

        head = self._head(gen, "text_completion")
        return event_stream(chunks(), head, include_usage, gen.usage, gen.abort)

    def _head(self, gen: Generation, kind: str) -> dict[str, Any]:
        return {"id": gen.id, "object": kind, "created": gen.created, "model": self.model_name}


async def event_stream(
    chunks: AsyncIterator[dict[str, Any]],
    head: dict[str, Any],
    include_usage: bool,
    usage: Callable[[], dict[str, Any]],
    abort: Callable[[], None],
) -> AsyncIterator[str]:
    """The SSE of one streamed completion: each chunk (its choices and any extra fields) under the
    shared head, the usage chunk if asked for, an error event if the request fails, and [DONE].
    The request is aborted however the stream ends (a no-op once it is done)."""
    if include_usage:
        head = {**head, "usage": None}
    try:
        async for chunk in chunks:
            yield _event({**head, **chunk})
        if include_usage:
            yield _event({**head, "choices": [], "usage": usage()})
    except ApiError as e:
        yield _event(e.body())
    finally:
        abort()
    yield "data: [DONE]\n\n"


def take_text(choice: Choice, delta: str | None) -> tuple[str, str]:
    """Route a delta (None: the end) through the choice's reasoning parser, then the answer
    through its tool-call parser; record the reasoning, the text and the calls."""
    if choice.parser is None:
        r, t = "", delta or ""
    else:
        r, t = choice.parser.finish() if delta is None else choice.parser.feed(delta)
    if choice.tools is not None:  # (it keeps the calls: choice.calls)
        t = choice.tools.feed(t)[0]
        if delta is None:
            t += choice.tools.finish()[0]
    choice.reasoning.append(r)
    choice.text.append(t)
    return r, t


def finish_reason(choice: Choice) -> str | None:
    if choice.calls and choice.finish_reason == "stop":
        return "tool_calls"
    return choice.finish_reason


def _finite(x: float) -> float:
    return max(x, -9999.0)  # JSON has no -inf


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
