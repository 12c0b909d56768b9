"""`POST /v1/responses`, OpenAI's Responses API, stateless.

A request is translated into a chat completion (input items -> messages, function tools ->
tools, `text.format` -> response_format) and runs through the same path; its output becomes
Responses items: a reasoning item, an assistant message, function calls. Streaming sends the
Responses event sequence (`response.created` ... `response.completed`). Nothing is stored:
`previous_response_id`, `conversation` and `background` are refused; `store` is ignored.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import Field

from thrifty.generation_defaults import GenerationDefaults
from thrifty.server.generation import Choice, Generation
from thrifty.server.protocol import ApiError, ChatCompletionRequest, Lenient, OpenAIRequest
from thrifty.server.responses import take_text
from thrifty.tokenizer import Tokenizer


class TextOptions(Lenient):
    format: dict[str, Any] | None = None
    verbosity: str | None = None  # accepted; changes nothing here


class ResponsesRequest(OpenAIRequest):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: TextOptions | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False
    # Accepted and ignored: they change nothing about the tokens generated here.
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: str | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    stream_options: dict[str, Any] | None = None
    # Refused when set: this server keeps no state between requests.
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool = False
    prompt: dict[str, Any] | None = None


def _text(content: Any, param: str) -> str:
    """An item's content (text, or a list of text parts) as text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, "content must be text or a list of parts", param=param)
    parts = []
    for p in content:
        if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text"):
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise ApiError(400, f"content parts of type {kind!r} are not supported", param=param)
        parts.append(str(p.get("text", "")))
    return "\n".join(parts)


def to_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request that does what a Responses request asks."""
    for field in ("previous_response_id", "conversation", "prompt"):
        if getattr(req, field) is not None:
            raise ApiError(400, f"{field} needs stored state, which this server does not keep;"
                           " send the whole input instead", param=field)  # fmt: skip
    if req.background:
        raise ApiError(400, "background responses are not supported", param="background")
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, item in enumerate(items):
        param = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ApiError(400, f"unknown role {role!r}", param=f"{param}.role")
            messages.append({"role": role, "content": _text(item.get("content", ""), param)})
        elif kind == "function_call":
            call = {"id": item.get("call_id", ""), "type": "function",
                    "function": {"name": item.get("name", ""),
                                 "arguments": item.get("arguments", "{}")}}  # fmt: skip
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            content = output if isinstance(output, str) else _text(output, f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id", ""),
                             "content": content})  # fmt: skip
        elif kind != "reasoning":  # earlier reasoning is not fed back, as in chat
            raise ApiError(400, f"input items of type {kind!r} are not supported", param=param)
    if not messages:
        raise ApiError(400, "the input is empty", param="input")
    chat: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "max_completion_tokens": req.max_output_tokens,
        "parallel_tool_calls": req.parallel_tool_calls,
    }
    # Left out, they stay out: the chat request then takes the model's defaults.
    chat |= {k: getattr(req, k) for k in ("temperature", "top_p") if k in req.model_fields_set}
    if req.tools:
        chat["tools"] = [_chat_tool(t, i) for i, t in enumerate(req.tools)]
    if isinstance(req.tool_choice, dict):
        if req.tool_choice.get("type") != "function" or "name" not in req.tool_choice:
            raise ApiError(400, "tool_choice must name a function", param="tool_choice")
        chat["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice["name"]}}
    elif req.tool_choice is not None:
        chat["tool_choice"] = req.tool_choice
    fmt = (req.text.format if req.text else None) or {"type": "text"}
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        chat["response_format"] = {"type": "json_schema", "json_schema": spec}
    elif fmt.get("type") in ("text", "json_object"):
        chat["response_format"] = {"type": fmt["type"]}
    else:
        raise ApiError(400, f"text.format of type {fmt.get('type')!r} is not supported",
                       param="text.format")  # fmt: skip
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValueError as e:  # pydantic's ValidationError: a malformed tool or message
        raise ApiError(400, str(e).splitlines()[0], param="input") from None


def _chat_tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    if tool.get("type") != "function" or "name" not in tool:
        raise ApiError(400, f"tools of type {tool.get('type')!r} are not supported; only"
                       " function tools are", param=f"tools.{i}")  # fmt: skip
    fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": fn}


class ResponsesApi:
    def __init__(
        self, tokenizer: Tokenizer, model_name: str, defaults: GenerationDefaults | None = None
    ):
        self.tokenizer, self.model_name = tokenizer, model_name
        self.defaults = defaults or GenerationDefaults()  # what a field left out was sampled with

    def _response(
        self, req: ResponsesRequest, rid: str, created: int, output: list, gen: Generation | None
    ) -> dict[str, Any]:
        status = "in_progress"
        incomplete = None
        usage = None
        if gen is not None:
            c = gen.choices[0]
            status = "incomplete" if c.finish_reason == "length" else "completed"
            if status == "incomplete":
                incomplete = {"reason": "max_output_tokens"}
            u = gen.usage()
            reasoning = "".join(c.reasoning)
            usage = {
                "input_tokens": u["prompt_tokens"],
                "input_tokens_details": {
                    "cached_tokens": u["prompt_tokens_details"]["cached_tokens"]
                },
                "output_tokens": u["completion_tokens"],
                "output_tokens_details": {
                    "reasoning_tokens": len(self.tokenizer.encode(reasoning, False))
                    if reasoning
                    else 0
                },
                "total_tokens": u["total_tokens"],
            }
        fmt = (req.text.format if req.text else None) or {"type": "text"}
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model_name,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": self._used(req, "temperature"),
            "text": {"format": fmt},
            "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "top_p": self._used(req, "top_p"),
            "truncation": "disabled",
            "usage": usage,
            "metadata": {},
        }

    def _used(self, req: ResponsesRequest, field: str) -> float:
        """The request's value where it gave one, else the model's default it was sampled with."""
        given = getattr(req, field) if field in req.model_fields_set else None
        return given if given is not None else getattr(self.defaults, field)

    async def full(self, req: ResponsesRequest, gen: Generation) -> dict[str, Any]:
        async for choice, out in gen.outputs():
            take_text(choice, out.delta_text)
        c = gen.choices[0]
        take_text(c, None)
        output = []
        if c.parser is not None and c.parser.opened:
            output.append(_reasoning_item("".join(c.reasoning)))
        text = "".join(c.text)
        if text.strip() or not c.calls:
            output.append(_message_item(text, "completed"))
        output += [_call_item(call) for call in c.calls]
        return self._response(req, _rid(), gen.created, output, gen)

    def stream(self, req: ResponsesRequest, gen: Generation) -> AsyncIterator[str]:
        return _Stream(self, req, gen).events()


def _rid() -> str:
    return f"resp_{uuid.uuid4().hex}"


def _reasoning_item(text: str, item_id: str | None = None) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id or f"rs_{uuid.uuid4().hex}", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}  # fmt: skip


def _message_item(text: str, status: str, item_id: str | None = None) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": item_id or f"msg_{uuid.uuid4().hex}", "role": "assistant",
            "status": status, "content": content if status == "completed" else []}  # fmt: skip


def _call_item(call, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.id,
            "name": call.name, "arguments": call.arguments, "status": status}  # fmt: skip


class _Stream:
    """The Responses event sequence of one streamed request."""

    def __init__(self, api: ResponsesApi, req: ResponsesRequest, gen: Generation):
        self.api, self.req, self.gen = api, req, gen
        self.rid, self.seq = _rid(), 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.text: list[str] = []

    def event(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    def response(self, done: bool) -> dict[str, Any]:
        gen = self.gen if done else None
        return self.api._response(self.req, self.rid, self.gen.created, self.output, gen)

    def begin(self, item: dict[str, Any]) -> list[str]:
        out = self.close()
        self.open, self.text = item, []
        index = len(self.output)
        out.append(self.event("response.output_item.added", output_index=index, item=item))
        if item["type"] == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out.append(self.event("response.content_part.added", item_id=item["id"],
                                  output_index=index, content_index=0, part=part))  # fmt: skip
        return out

    def close(self) -> list[str]:
        """Finish the open item (reasoning or message) and record it."""
        item, self.open = self.open, None
        if item is None:
            return []
        index, text, ids = len(self.output), "".join(self.text), {"item_id": item["id"]}
        out = []
        if item["type"] == "reasoning":
            item = _reasoning_item(text, item["id"])
            out.append(self.event("response.reasoning_text.done", **ids, output_index=index,
                                  content_index=0, text=text))  # fmt: skip
        else:
            item = _message_item(text, "completed", item["id"])
            part = item["content"][0]
            out.append(self.event("response.output_text.done", **ids, output_index=index,
                                  content_index=0, text=text, logprobs=[]))  # fmt: skip
            out.append(self.event("response.content_part.done", **ids, output_index=index,
                                  content_index=0, part=part))  # fmt: skip
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        self.output.append(item)
        return out

    def delta(self, kind: str, text: str) -> list[str]:
        out = []
        if self.open is None or self.open["type"] != kind:
            item = _reasoning_item("") if kind == "reasoning" else _message_item("", "in_progress")
            out += self.begin(item)
        self.text.append(text)
        name = (
            "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        )
        extra = {} if kind == "reasoning" else {"logprobs": []}
        out.append(self.event(name, item_id=self.open["id"], output_index=len(self.output),
                              content_index=0, delta=text, **extra))  # fmt: skip
        return out

    def call(self, call) -> list[str]:
        out = self.close()
        index, item = len(self.output), _call_item(call)
        added = {**item, "arguments": "", "status": "in_progress"}
        out.append(self.event("response.output_item.added", output_index=index, item=added))
        ids = {"item_id": item["id"], "output_index": index}
        out.append(self.event("response.function_call_arguments.delta", **ids,
                              delta=call.arguments))  # fmt: skip
        out.append(self.event("response.function_call_arguments.done", **ids,
                              name=call.name, arguments=call.arguments))  # fmt: skip
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        self.output.append(item)
        return out

    def step(self, c: Choice, delta: str | None) -> list[str]:
        first_call = len(c.calls)
        r, t = take_text(c, delta)
        out = self.delta("reasoning", r) if r else []
        if t:
            out += self.delta("message", t)
        for call in c.calls[first_call:]:
            out += self.call(call)
        return out

    async def events(self) -> AsyncIterator[str]:
        yield self.event("response.created", response=self.response(False))
        yield self.event("response.in_progress", response=self.response(False))
        try:
            async for c, out in self.gen.outputs():
                for e in self.step(c, out.delta_text):
                    yield e
            for e in self.step(self.gen.choices[0], None):
                yield e
            if not self.output and self.open is None:  # an empty answer is still a message
                for e in self.begin(_message_item("", "in_progress")):
                    yield e
            for e in self.close():
                yield e
        except ApiError as e:
            body = e.body()["error"]
            yield self.event("error", code=body["code"], message=body["message"],
                             param=body["param"])  # fmt: skip
            return
        finally:
            self.gen.abort()
        final = self.response(True)
        yield self.event(f"response.{final['status']}", response=final)
