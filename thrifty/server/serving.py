"""Chat and text completions, request side: checks and limits, prompts, sampling params.

A validated request becomes a Generation (thrifty/server/generation.py) ready to start; its
output is turned into OpenAI JSON by thrifty/server/responses.py. A request with
`test_time_scaling` becomes a ScalingRun instead (thrifty/server/scaling.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.structured import Constraint, Grammars
from thrifty.errors import ThriftyError
from thrifty.generation_defaults import FIELDS, GenerationDefaults
from thrifty.server.async_engine import AsyncEngine
from thrifty.server.config import ServerConfig
from thrifty.server.generation import Generation, Parsers
from thrifty.server.metrics import Metrics
from thrifty.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingRequest,
)
from thrifty.server.reasoning import THINK_END, THINK_START, ReasoningParser, prompt_opens_reasoning
from thrifty.server.scaling import ScalingRun, scaling_config
from thrifty.server.structured import ToolSetup, answer_constraint, chat_constraint
from thrifty.server.tools import ToolCallParser, ToolFormat
from thrifty.tokenizer import Tokenizer
from thrifty.tts import ThinkingBudget

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024  # each is searched for after every token
_RESERVED_TEMPLATE_KWARGS = {
    "messages", "add_generation_prompt", "bos_token", "eos_token", "tools"
}  # fmt: skip


class Serving:
    """Turns validated OpenAI requests into engine work and engine output into OpenAI JSON."""

    def __init__(
        self,
        engine: AsyncEngine,
        tokenizer: Tokenizer,
        max_model_len: int,
        config: ServerConfig,
        metrics: Metrics,
        grammars: Grammars | None = None,
        defaults: GenerationDefaults | None = None,
    ):
        self.engine, self.tokenizer, self.max_model_len = engine, tokenizer, max_model_len
        # What a request that leaves a sampling field out gets (OpenAI clients usually do).
        self.defaults = defaults or GenerationDefaults()
        self.config, self.metrics = config, metrics
        self._grammars = grammars  # the engine's; built here on first use where none was given
        self.tool_format = ToolFormat.detect(tokenizer.chat_template)
        self.num_queued = 0  # completions waiting for a first token (changed on the loop only)
        encode = tokenizer.encode
        self.thinks = all(
            len(encode(t, add_special_tokens=False)) == 1 for t in (THINK_START, THINK_END)
        )

    # -- requests -> engine work ----------------------------------------------------------------

    def _check_common(self, req: SamplingRequest, num_prompts: int = 1) -> None:
        """Model, limits and queue. A request's cost is its completions: prompts x n."""
        if req.model is not None and req.model != self.config.model_name:
            raise ApiError(
                404,
                f"the model {req.model!r} does not exist; this server serves"
                f" {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )
        limit, choices = self.config.max_n, num_prompts * req.n
        if num_prompts == 1 and req.n > limit:
            raise ApiError(400, f"n must be at most {limit}", param="n")
        if choices > limit:
            raise ApiError(
                400,
                f"this request asks for {num_prompts} prompts x n={req.n} = {choices}"
                f" completions; this server takes at most {limit} per request (--max-n)",
                param="prompt",
            )
        queued = self.num_queued
        if queued and queued + choices > self.config.max_queued_requests:
            raise ApiError(429, "too many requests are waiting; retry later", code="queue_full")
        if not self.engine.alive:
            raise ApiError(503, "the engine is not running")

    def check_constraint(self, constraint: Constraint | None) -> None:
        """Compile a request's grammar (slow for a large schema: call it off the event loop);
        a 400 if it is invalid."""
        if constraint is None:
            return
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.tokenizer.vocab_size)
        try:
            self._grammars.check(constraint)
        except ThriftyError as e:
            raise ApiError(400, str(e), param="response_format") from None

    def _logit_bias(self, req: SamplingRequest) -> tuple[tuple[int, float], ...]:
        out = []
        vocab = self.tokenizer.vocab_size
        for key, bias in (req.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocab:
                raise ApiError(400, f"logit_bias keys must be token ids in [0, {vocab}): {key!r}",
                               param="logit_bias")  # fmt: skip
            out.append((int(key), bias))
        return tuple(out)

    def _params(
        self,
        req: SamplingRequest,
        prompts: list[list[int]],
        max_tokens: int | None,
        logprobs,
        constraint: Constraint | None = None,
        skip_special_tokens: bool = True,
    ) -> list[SamplingParams]:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise ApiError(400, f"stop strings may be at most {MAX_STOP_CHARS} characters long",
                           param="stop")  # fmt: skip
        asked = {k: getattr(req, k) for k in FIELDS if k in req.model_fields_set}
        try:
            base = SamplingParams(
                **self.defaults.fill(asked),
                min_p=req.min_p,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                # Any integer is a valid OpenAI seed; the engine's generators take 64 bits.
                seed=None if req.seed is None else req.seed % 2**40,
                n=req.n,
                stop=tuple(stop),
                logprobs=logprobs,
                ignore_eos=req.ignore_eos,
                constraint=constraint,
                logit_bias=self._logit_bias(req),
                skip_special_tokens=skip_special_tokens,
            )
        except ThriftyError as e:
            raise ApiError(400, str(e)) from None
        out = []
        for ids in prompts:
            self._check_context(req, ids, max_tokens)
            out.append(replace(base, max_tokens=max_tokens or self.max_model_len - len(ids)))
        return out

    def _check_context(self, req: SamplingRequest, ids: list[int], max_tokens: int | None) -> None:
        ctx = self.max_model_len
        if len(ids) >= ctx:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; this model's context holds {ctx},"
                " including at least one generated token",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        if max_tokens is not None and len(ids) + max_tokens > ctx:
            raise ApiError(
                400,
                f"max_tokens is too large: the prompt has {len(ids)} tokens and this model's"
                f" context holds {ctx}, so at most {ctx - len(ids)} can be generated",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def _completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        prompt = _prompt_list(req)
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        vocab = self.tokenizer.vocab_size
        out = []
        for p in prompt:
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise ApiError(400, "the prompt is empty", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            out.append(ids)
        return out

    def _chat_prompt(
        self, req: ChatCompletionRequest, tools: ToolSetup | None = None
    ) -> tuple[str, list[int]]:
        self._check_common(req)
        prompt = render_chat(self.tokenizer, req, self.tool_format, tools)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)  # the template wrote them
        return prompt, ids

    def chat(self, req: ChatCompletionRequest) -> tuple[Generation, list[Parsers]]:
        tools = ToolSetup.of(req)
        prompt, ids = self._chat_prompt(req, tools)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = req.max_completion_tokens or req.max_tokens
        fmt = self.tool_format
        constraint = chat_constraint(answer_constraint(req), tools, fmt, self.tokenizer)
        keep_special = tools.active and fmt.uses_special_tokens  # the markers are special tokens
        params = self._params(
            req, [ids], max_tokens, logprobs, constraint, skip_special_tokens=not keep_special
        )
        hook = self._thinking_budget(req.max_thinking_tokens, req.min_thinking_tokens or 0)
        opened = prompt_opens_reasoning(prompt)
        parsers = [
            Parsers(
                ReasoningParser(opened) if self.thinks else None,
                ToolCallParser(fmt, tools.bare_names) if tools.active else None,
            )
            for _ in range(req.n)
        ]
        return Generation(self, [ids], params, "chatcmpl", hook), parsers

    def completion(self, req: CompletionRequest) -> Generation:
        self._check_common(req, len(_prompt_list(req)))
        prompts = self._completion_prompts(req)
        constraint = answer_constraint(req)
        params = self._params(req, prompts, req.max_tokens or 16, req.logprobs, constraint)
        return Generation(self, prompts, params, "cmpl")

    def _thinking_budget(self, max_tokens: int | None, min_tokens: int) -> ThinkingBudget | None:
        if max_tokens is None and not min_tokens:
            return None
        param = "max_thinking_tokens" if max_tokens is not None else "min_thinking_tokens"
        if not self.thinks:
            raise ApiError(
                400,
                f"{param} needs a thinking model: this one has no single <think> and </think>"
                " tokens",
                param=param,
            )
        try:
            return ThinkingBudget(self.tokenizer, max_tokens, min_tokens)
        except ThriftyError as e:
            raise ApiError(400, str(e), param="min_thinking_tokens") from None

    # -- test-time scaling (thrifty/server/scaling.py) ------------------------------------------

    def _scaling(
        self, req: SamplingRequest, ids: list[int], kind: str, opened: bool | None
    ) -> ScalingRun:
        self._check_context(req, ids, None)  # the prompt fits, before its room sets defaults
        config = scaling_config(req, self.config.max_n, self.max_model_len - len(ids))
        self._check_context(req, ids, config.max_tokens)
        self._thinking_budget(config.max_thinking_tokens, config.min_thinking_tokens)  # checks
        return ScalingRun(self, ids, config, kind, opened)

    def chat_scaling(self, req: ChatCompletionRequest) -> ScalingRun:
        prompt, ids = self._chat_prompt(req)
        opened = prompt_opens_reasoning(prompt) if self.thinks else None
        return self._scaling(req, ids, "chatcmpl", opened)

    def completion_scaling(self, req: CompletionRequest) -> ScalingRun:
        self._check_common(req, len(_prompt_list(req)))
        prompts = self._completion_prompts(req)
        if len(prompts) != 1:
            raise ApiError(400, "test_time_scaling takes one prompt", param="prompt")
        return self._scaling(req, prompts[0], "cmpl", None)


def _prompt_list(req: CompletionRequest) -> list[str] | list[list[int]]:
    """A completion request's prompts, each text or token ids, none yet tokenized."""
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]  # type: ignore[list-item]
    return prompt  # type: ignore[return-value]


def render_chat(
    tokenizer: Tokenizer,
    req: ChatCompletionRequest,
    fmt: ToolFormat | None = None,
    tools: ToolSetup | None = None,
) -> str:
    """The prompt text for a chat request: messages and tools as the model's template takes
    them (in `fmt`, by default the one its template uses); `chat_template_kwargs` go to the
    template."""
    fmt = fmt or ToolFormat.detect(tokenizer.chat_template)
    tools = tools or ToolSetup.of(req)
    kwargs = dict(req.chat_template_kwargs or {})
    if bad := _RESERVED_TEMPLATE_KWARGS & kwargs.keys():
        raise ApiError(
            400, f"chat_template_kwargs may not set {sorted(bad)}", param="chat_template_kwargs"
        )
    messages = [_template_message(m) for m in req.messages]
    messages, tool_kwargs = fmt.render(messages, tools.tools if tools.active else None)
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, **tool_kwargs, **kwargs
        )
    except ThriftyError as e:
        raise ApiError(400, str(e), param="messages") from None


def _template_message(m: ChatMessage) -> dict[str, Any]:
    """A message as the chat template sees it: text content only, reasoning_content left out."""
    if isinstance(m.content, list):
        parts = []
        for p in m.content:
            if p.type != "text" or p.text is None:
                raise ApiError(
                    400, f"content parts of type {p.type!r} are not supported", param="messages"
                )
            parts.append(p.text)
        content = "\n".join(parts)
    else:
        content = m.content or ""
    out: dict[str, Any] = {
        "role": "system" if m.role == "developer" else m.role,
        "content": content,
    }
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    return out
