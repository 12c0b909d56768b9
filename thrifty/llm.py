"""The Python API: `LLM(model).generate(prompts, SamplingParams(...))`, `.chat()`, `.stream()`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from thrifty import hub
from thrifty.config import EngineConfig, resolve_dtype, resolve_kv_cache_dtype
from thrifty.engine.llm_engine import LLMEngine, Request
from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.sequence import TokenLogprob

Message = dict[str, Any]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @staticmethod
    def of(request: Request) -> RequestOutput:
        return RequestOutput(
            request.request_id,
            request.prompt_token_ids,
            [
                CompletionOutput(
                    s.index,
                    s.output_text,
                    s.output_token_ids,
                    s.finish_reason,
                    s.logprobs if s.params.logprobs is not None else None,
                )
                for s in request.seqs
            ],
            request.num_cached_tokens,
        )


class LLM:
    """A model ready to generate: a registry name, a local path or a hub id (None: the default)."""

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        allow_pickle: bool = False,
        progress: bool = True,
        **engine_kwargs: Any,
    ):
        path = hub.resolve(model, progress=progress)
        resolved = resolve_dtype(dtype, path, device)
        kv = resolve_kv_cache_dtype(engine_kwargs.pop("kv_cache_dtype", "auto"), dtype, resolved)
        config = EngineConfig(dtype=resolved, device=device, kv_cache_dtype=kv, **engine_kwargs)
        self.engine = LLMEngine(path, config, allow_pickle=allow_pickle)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt together, in one continuous batch; results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params_list = (
            params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        )
        engine = self.engine
        ids = []
        try:
            for prompt, p in zip(prompts, params_list, strict=True):
                ids.append(engine.add_request(prompt, p))
            while engine.has_unfinished():
                engine.step()
        finally:
            for rid in ids:
                if rid in engine.requests and not engine.requests[rid].finished:
                    engine.abort(rid)
        return [RequestOutput.of(engine.pop_finished(rid)) for rid in ids]

    def chat_prompt(self, messages: list[Message], **template_kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, **template_kwargs
        )

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        params: SamplingParams | None = None,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Generate the assistant's reply to one conversation (or to each of several)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self._chat_ids(c, **template_kwargs) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, params)

    def _chat_ids(self, messages: list[Message], **template_kwargs: Any) -> list[int]:
        # The template writes the special tokens itself: encode without adding a BOS.
        return self.tokenizer.encode(
            self.chat_prompt(messages, **template_kwargs), add_special_tokens=False
        )

    def stream(
        self, prompt: str | list[int] | list[Message], params: SamplingParams | None = None
    ) -> Iterator[str]:
        """Yield the text of one completion as it is generated (n is taken as 1).

        A prompt given as a list of messages is rendered with the chat template. Closing the
        iterator early (e.g. on Ctrl-C) aborts the request and frees its blocks.
        """
        params = dataclasses.replace(params or SamplingParams(), n=1)
        if prompt and isinstance(prompt, list) and isinstance(prompt[0], dict):
            prompt = self._chat_ids(prompt)  # type: ignore[arg-type]
        engine = self.engine
        rid = engine.add_request(prompt, params)  # type: ignore[arg-type]
        try:
            while not engine.requests[rid].finished:
                for out in engine.step():
                    if out.request_id == rid and out.delta_text:
                        yield out.delta_text
        finally:
            engine.abort(rid)
