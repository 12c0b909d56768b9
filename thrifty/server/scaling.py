"""Test-time scaling through the server: a request with a `test_time_scaling` object runs as one
thrifty.tts job on the engine loop (which steps it beside every other request) and is answered
with one choice, the chosen sample, plus the vote in an extra `test_time_scaling` field:

    {"strategy", "answer", "votes": {answer: weight}, "num_samples", "num_stopped_early",
     "tokens", "num_cached_tokens", "wall_s", "threshold", "finish_reason", "samples": [...]}

`usage.completion_tokens` counts every token the job generated, over all samples, and
`prompt_tokens` the prompt once (its samples and waves share its KV blocks). A stream sends the
role first and then, once the vote is in, the whole answer in one chunk.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from thrifty.errors import ThriftyError
from thrifty.server.async_engine import Failed
from thrifty.server.protocol import ApiError, SamplingRequest
from thrifty.server.reasoning import split_reasoning
from thrifty.server.responses import event_stream
from thrifty.tts import Job, TTSConfig

if TYPE_CHECKING:
    from thrifty.server.serving import Serving

# Request fields a scaling run takes over when the client set them (test_time_scaling wins).
INHERITED = ("temperature", "top_p", "top_k", "seed", "max_thinking_tokens", "min_thinking_tokens")
# test_time_scaling fields where an explicit null is a value, not "unset"
NULLABLE = ("consensus",)
# Request fields that mean nothing to a run that samples, votes and answers once.
UNSUPPORTED = (
    "stop",
    "logprobs",
    "top_logprobs",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "response_format",
    "structured_outputs",
    "tools",
    "echo",
)


def scaling_config(req: SamplingRequest, max_n: int, room: int) -> TTSConfig:
    """The TTSConfig of a request: test_time_scaling's fields, then the request's, then the
    defaults. `room`: tokens the context leaves after the prompt, the default max_tokens' cap;
    the caller checks a max_tokens that was asked for against it."""
    assert req.test_time_scaling is not None
    if req.n != 1:
        raise ApiError(400, "with test_time_scaling, n must be 1 (set test_time_scaling.n)", "n")
    for name in UNSUPPORTED:
        if name not in req.model_fields_set:
            continue
        value = getattr(req, name)
        harmless = (None, [], {}, type(req).model_fields[name].default)
        if value not in harmless and getattr(value, "type", None) != "text":
            raise ApiError(400, f"{name} is not supported with test_time_scaling", param=name)
    fields = {k: getattr(req, k, None) for k in INHERITED if k in req.model_fields_set}
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    asked = req.test_time_scaling
    fields |= {"max_tokens": max_tokens, **asked.model_dump(exclude_none=True)}
    # null means "unset", except where it is a setting of its own (consensus: draw all n)
    nulls = {k: None for k in NULLABLE if k in asked.model_fields_set and getattr(asked, k) is None}
    fields = {k: v for k, v in fields.items() if v is not None} | nulls
    fields.setdefault("max_tokens", min(TTSConfig.max_tokens, room))
    n = fields.setdefault("n", min(TTSConfig.n, max_n))
    if n > max_n:
        raise ApiError(400, f"test_time_scaling.n must be at most {max_n}", "test_time_scaling.n")
    # deepconf's warm-up must leave samples to run: as `thrifty run`, fewer for a small n.
    fields.setdefault("warmup", min(TTSConfig.warmup, max(n - 1, 1)))
    if fields.get("seed") is not None:
        fields["seed"] %= 2**40  # any integer is a valid OpenAI seed; generators take 64 bits
    try:
        return TTSConfig(**fields)
    except ThriftyError as e:
        raise ApiError(400, f"test_time_scaling: {e}", param="test_time_scaling") from None


class ScalingRun:
    """One scaling job behind one HTTP request."""

    def __init__(
        self, serving: Serving, ids: list[int], config: TTSConfig, kind: str, opened: bool | None
    ):
        self.serving = serving
        self.id = f"{kind}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.arrival = time.perf_counter()
        self.job = Job(serving.engine.engine, ids, config)
        self.chat = kind == "chatcmpl"  # else a text completion
        self.opened = opened  # the template opened <think> (None: not a thinking model)
        self.num_prompt_tokens = len(ids)
        self.queue: asyncio.Queue = asyncio.Queue()
        self._running = False

    def start(self) -> None:
        serving = self.serving
        # It counts as waiting until it is done: it has no first token to show before that.
        serving.num_queued += 1
        self._running = True
        serving.engine.add_job(self.job, self.queue)
        serving.metrics.prompt_tokens.inc(self.num_prompt_tokens)

    def _finish(self) -> None:
        if self._running:
            self._running = False
            self.serving.num_queued -= 1

    def abort(self) -> None:
        """Stop every sample of the job and free their blocks (a no-op once it is done)."""
        if self._running:
            self._finish()
            self.serving.engine.abort_job(self.job.job_id)

    async def result(self) -> dict[str, Any]:
        item = await self.queue.get()
        if isinstance(item, Failed):
            self.abort()
            raise ApiError(item.status, item.message)
        self._finish()
        # Off the event loop: merging symbolic answers may ask a sympy process.
        result = await asyncio.to_thread(self.job.result)
        metrics = self.serving.metrics
        metrics.generation_tokens.inc(result["tokens"])
        metrics.cached_tokens.inc(result["num_cached_tokens"])
        metrics.e2e.observe(time.perf_counter() - self.arrival)
        return result

    def message(self, result: dict[str, Any]) -> dict[str, Any]:
        """The chosen sample as a chat message, its reasoning split off for thinking models."""
        text = result["text"]
        if self.opened is None:
            return {"role": "assistant", "content": text}
        reasoning, content = split_reasoning(text, self.opened)
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return message

    def usage(self, result: dict[str, Any]) -> dict[str, Any]:
        return {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": result["tokens"],
            "total_tokens": self.num_prompt_tokens + result["tokens"],
            "prompt_tokens_details": {"cached_tokens": result["num_cached_tokens"]},
        }

    def head(self, kind: str, model: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": model}

    def choice(self, result: dict[str, Any], streamed: bool) -> dict[str, Any]:
        """The chosen sample as the one choice of a chat or text completion (or chunk)."""
        finish = result["finish_reason"] or "stop"
        if not self.chat:
            return {"index": 0, "text": result["text"], "logprobs": None, "finish_reason": finish}
        message = self.message(result)
        if streamed:
            del message["role"]  # sent in the first chunk
            return _delta(message, finish)
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}

    async def full(self, model: str) -> dict[str, Any]:
        result = await self.result()
        return {
            **self.head("chat.completion" if self.chat else "text_completion", model),
            "choices": [self.choice(result, streamed=False)],
            "usage": self.usage(result),
            "test_time_scaling": _summary(result),
        }

    def stream(self, model: str, include_usage: bool) -> AsyncIterator[str]:
        result: dict[str, Any] = {}

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            if self.chat:
                yield {"choices": [_delta({"role": "assistant", "content": ""})]}
            result.update(await self.result())
            choice = self.choice(result, streamed=True)
            yield {"choices": [choice], "test_time_scaling": _summary(result)}

        head = self.head("chat.completion.chunk" if self.chat else "text_completion", model)
        return event_stream(chunks(), head, include_usage, lambda: self.usage(result), self.abort)


def _delta(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The vote and its cost; the chosen text is the choice itself."""
    return {k: v for k, v in result.items() if k != "text"}
