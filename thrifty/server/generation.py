"""The engine requests behind one HTTP request, and what they have produced so far.

One HTTP request becomes one engine request per prompt (each with `n` samples); choice `k * n + i`
is sample `i` of prompt `k`. Results arrive on one asyncio.Queue, filled by the engine loop.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from thrifty.engine.llm_engine import StepOutput
from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.sequence import TokenLogprob
from thrifty.server.async_engine import Failed, Finished, TokenHook
from thrifty.server.protocol import ApiError
from thrifty.server.reasoning import ReasoningParser
from thrifty.server.tools import ToolCall, ToolCallParser

if TYPE_CHECKING:
    from thrifty.server.serving import Serving


@dataclass
class Parsers:
    """How one choice's text is split: reasoning first, then tool calls out of the answer."""

    reasoning: ReasoningParser | None = None
    tools: ToolCallParser | None = None


@dataclass
class Choice:
    index: int
    parser: ReasoningParser | None
    tools: ToolCallParser | None = None
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    last_time: float | None = None

    @property
    def calls(self) -> list[ToolCall]:
        """The tool calls read out of the answer so far."""
        return self.tools.calls if self.tools is not None else []


class Generation:
    """The engine requests behind one HTTP request, and what they have produced so far."""

    def __init__(
        self,
        serving: Serving,
        prompts: list[list[int]],
        params: list[SamplingParams],
        kind: str,
        token_hook: TokenHook | None = None,
    ):
        self.serving = serving
        self.token_hook = token_hook  # e.g. a thinking budget, for every sample
        self.id = f"{kind}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.arrival = time.perf_counter()
        self.queue: asyncio.Queue = asyncio.Queue()
        n = params[0].n
        self.rids = [f"{self.id}-{k}" for k in range(len(prompts))]
        self.offset = {rid: k * n for k, rid in enumerate(self.rids)}
        self.choices: list[Choice] = []
        self.prompts, self.params = prompts, params
        self.num_prompt_tokens = sum(len(p) for p in prompts)
        self.num_cached_tokens = 0
        self.unfinished = set(self.rids)
        self.first_token_time: float | None = None
        self._queued = False

    def start(self, parsers: list[Parsers] | None = None) -> None:
        """Hand the requests to the engine; `parsers`: one per choice (chat only)."""
        num_choices = len(self.prompts) * self.params[0].n
        parsers = parsers or [Parsers() for _ in range(num_choices)]
        self.choices = [Choice(i, p.reasoning, p.tools) for i, p in enumerate(parsers)]
        serving = self.serving
        serving.num_queued += num_choices  # a request costs its completions in the queue
        self._queued = True
        for rid, ids, p in zip(self.rids, self.prompts, self.params, strict=True):
            serving.engine.add(rid, ids, p, self.queue, self.token_hook)
        serving.metrics.prompt_tokens.inc(self.num_prompt_tokens)

    def _dequeue(self) -> None:
        if self._queued:
            self._queued = False
            self.serving.num_queued -= len(self.choices)

    def abort(self) -> None:
        """Abort whatever is still running (a no-op once everything finished)."""
        self._dequeue()
        for rid in self.unfinished:
            self.serving.engine.abort(rid)
        self.unfinished.clear()

    async def outputs(self) -> AsyncIterator[tuple[Choice, StepOutput]]:
        """Yield (choice, output) as the engine produces them, until every request finished."""
        metrics = self.serving.metrics
        while self.unfinished:
            item = await self.queue.get()
            if isinstance(item, Failed):
                self.abort()
                raise ApiError(item.status, item.message)
            if isinstance(item, Finished):
                self.unfinished.discard(item.request_id)
                self.num_cached_tokens += item.num_cached_tokens
                metrics.cached_tokens.inc(item.num_cached_tokens)
                continue
            now = time.perf_counter()
            choice = self.choices[self.offset[item.request_id] + item.index]
            if self.first_token_time is None:
                self.first_token_time = now
                self._dequeue()
                metrics.ttft.observe(now - self.arrival)
            if choice.last_time is not None:
                metrics.itl.observe(now - choice.last_time)
            choice.last_time = now
            choice.num_tokens += len(item.token_ids)
            metrics.generation_tokens.inc(len(item.token_ids))
            choice.logprobs += item.logprobs
            choice.finish_reason = item.finish_reason
            yield choice, item
        metrics.e2e.observe(time.perf_counter() - self.arrival)

    def usage(self) -> dict[str, Any]:
        completion = sum(c.num_tokens for c in self.choices)
        return {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.num_prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens},
        }
