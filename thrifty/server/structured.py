"""A request's structured-output fields and tools -> the one Constraint its output must match.

- `response_format` (json_object, json_schema) or `structured_outputs` (json, regex, grammar,
  choice, json_object) constrain the answer;
- `tool_choice` "required" or a named function constrains the output to tool calls;
- with `tool_choice` "auto" and a constrained answer, the output is either the answer or calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

from thrifty.engine.structured import Constraint, json_schema_lark
from thrifty.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    NamedToolChoice,
    SamplingRequest,
)
from thrifty.server.tools import ToolFormat
from thrifty.tokenizer import Tokenizer


def answer_constraint(req: SamplingRequest) -> Constraint | None:
    """What `response_format` / `structured_outputs` ask of the answer, if anything."""
    so, rf = req.structured_outputs, req.response_format
    if so is not None:
        given = {k: v for k, v in so.model_dump(by_alias=True).items() if v not in (None, False)}
        if len(given) != 1:
            raise ApiError(
                400, "structured_outputs takes exactly one of json, regex, grammar, choice,"
                " json_object", param="structured_outputs",
            )  # fmt: skip
        if rf is not None and rf.type != "text":
            raise ApiError(400, "give response_format or structured_outputs, not both",
                           param="structured_outputs")  # fmt: skip
        ((kind, value),) = given.items()
        if kind == "json":
            return Constraint("json_schema", value if isinstance(value, str) else json.dumps(value))
        if kind == "json_object":
            return Constraint("json_object")
        if kind == "regex":
            return Constraint("regex", value)
        if kind == "choice":
            if not value:
                raise ApiError(400, "choice must not be empty", param="structured_outputs.choice")
            return Constraint("choice", json.dumps(value))
        return Constraint("lark", _lark(value))
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return Constraint("json_object")
    if rf.json_schema is None:
        raise ApiError(400, "response_format of type json_schema needs json_schema",
                       param="response_format.json_schema")  # fmt: skip
    return Constraint("json_schema", json.dumps(rf.json_schema.schema_))


def _lark(grammar: str) -> str:
    """A grammar as Lark: GBNF (llama.cpp's `root ::= ...`) is converted."""
    try:
        return any_to_lark(grammar)
    except GbnfToLarkError as e:
        raise ApiError(400, f"invalid grammar: {e}", param="structured_outputs.grammar") from None


@dataclass(frozen=True)
class ToolSetup:
    """What a chat request's tools mean for its prompt, its grammar and its parsing."""

    tools: list[dict[str, Any]]  # {"type": "function", "function": {...}} for the template
    choice: str  # "none", "auto", "required" or "named"
    named: str | None
    parallel: bool

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @staticmethod
    def of(req: ChatCompletionRequest) -> ToolSetup:
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        names = [t["function"]["name"] for t in tools]
        choice = req.tool_choice or ("auto" if tools else "none")
        named = None
        if isinstance(choice, NamedToolChoice):
            named, choice = choice.function.name, "named"
            if named not in names:
                raise ApiError(400, f"tool_choice names {named!r}, which is not in tools",
                               param="tool_choice")  # fmt: skip
        if choice in ("required", "named") and not tools:
            raise ApiError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
        if len(set(names)) != len(names):
            raise ApiError(400, "tools have duplicate names", param="tools")
        return ToolSetup(tools, choice, named, req.parallel_tool_calls)

    @property
    def many(self) -> bool:
        """Whether several calls may come (a named choice is one call, as OpenAI's)."""
        return self.parallel and self.choice != "named"

    @property
    def bare_names(self) -> tuple[str, ...]:
        """The tools whose calls may come without markers: with "auto" only, since a grammar
        writes the markers otherwise."""
        if self.choice != "auto":
            return ()
        return tuple(t["function"]["name"] for t in self.tools)

    def functions(self) -> list[dict[str, Any]]:
        fns = [t["function"] for t in self.tools]
        return [f for f in fns if f["name"] == self.named] if self.named else fns


def chat_constraint(
    answer: Constraint | None, setup: ToolSetup, fmt: ToolFormat, tokenizer: Tokenizer
) -> Constraint | None:
    """The constraint of a chat request's whole output."""
    if not setup.active or setup.choice == "auto" and answer is None:
        return answer
    rule, calls = fmt.calls_grammar(setup.functions(), setup.many, tokenizer)
    if setup.choice != "auto":
        return Constraint("lark", f"start: {rule}\n{calls}")
    return Constraint("lark", f"start: answer | {rule}\nanswer: {_answer_rule(answer)}\n{calls}")


def _answer_rule(answer: Constraint) -> str:
    """A constrained answer as the body of a Lark rule, to stand beside tool calls."""
    if answer.kind == "json_schema":
        return json_schema_lark(json.loads(answer.spec))
    if answer.kind == "json_object":
        return json_schema_lark({"type": "object"})
    if answer.kind == "choice":
        return " | ".join(json.dumps(c) for c in json.loads(answer.spec))
    if answer.kind == "regex":
        return "/" + answer.spec.replace("/", "\\/") + "/"
    raise ApiError(400, "a grammar cannot be combined with tool_choice 'auto'; use "
                   "tool_choice 'none' or 'required'", param="tool_choice")  # fmt: skip
