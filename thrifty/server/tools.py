"""Tool calls: how a model is told about tools, how its calls are read back, and the grammar
that makes it call one.

Two wire formats, chosen from the chat template:
- Hermes / Qwen: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per
  call. Models whose template knows no tools (SmolLM2's ChatML) are told about tools in this
  format too, in a system message written the way Qwen's template writes it.
- DeepSeek-V3 and V3.1: special tokens around each call,
  `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>` (V3) or
  `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>` (V3.1), inside
  `<｜tool▁calls▁begin｜>...<｜tool▁calls▁end｜>`.

`tool_choice` "required" or a named function is enforced by a Lark grammar (llguidance) built
here, so the call always parses; "auto" lets the model choose and parses what it wrote.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from thrifty.engine.structured import json_schema_lark
from thrifty.server.reasoning import partial_tag_len
from thrifty.tokenizer import Tokenizer

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"

HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments"
    " within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ToolFormat:
    name: str  # "hermes", "deepseek_v3" or "deepseek_v31"
    template_has_tools: bool  # whether the chat template renders `tools` itself

    @staticmethod
    def detect(template: str) -> ToolFormat:
        has_tools = "tools" in template
        if CALL_BEGIN in template:
            v3 = "```json" in template  # V3 wraps the arguments in a json code block
            return ToolFormat("deepseek_v3" if v3 else "deepseek_v31", has_tools)
        return ToolFormat("hermes", has_tools and "<tool_call>" in template)

    @property
    def region_start(self) -> str:
        return "<tool_call>" if self.name == "hermes" else CALLS_BEGIN

    @property
    def call_end(self) -> str:
        return "</tool_call>" if self.name == "hermes" else CALL_END

    @property
    def uses_special_tokens(self) -> bool:
        """Whether the markers are special tokens, which detokenization must then keep."""
        return self.name != "hermes"

    def parse_call(self, chunk: str) -> ToolCall | None:
        """One call's text (up to its end marker, which is not included); None if it is not
        a well-formed call."""
        if self.name == "hermes":
            text = chunk.strip()
            if not text.startswith("<tool_call>"):
                return None
            try:
                body = json.loads(text[len("<tool_call>") :])
            except json.JSONDecodeError:
                return None
            if not isinstance(body, dict) or not isinstance(body.get("name"), str):
                return None
            return ToolCall(body["name"], _arguments_text(body.get("arguments", {})))
        text = chunk.replace(CALLS_BEGIN, "").strip()
        if not text.startswith(CALL_BEGIN) or SEP not in text:
            return None
        head, _, rest = text[len(CALL_BEGIN) :].partition(SEP)
        if self.name == "deepseek_v3":
            name, _, args = rest.partition("\n")
            args = args.strip().removeprefix("```json").removesuffix("```").strip()
        else:
            name, args = head, rest
        try:
            return ToolCall(name.strip(), _arguments_text(json.loads(args)))
        except json.JSONDecodeError:
            return None

    # -- prompts ----------------------------------------------------------------------------

    def render(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Messages (with OpenAI tool_calls / tool roles) and tools as this model's template
        takes them: (messages, extra template arguments)."""
        if self.template_has_tools:
            # Qwen's template writes `arguments | tojson` (an object); DeepSeek's concatenates
            # them as the JSON text OpenAI sends.
            out = (
                [_with_parsed_arguments(m) for m in messages] if self.name == "hermes" else messages
            )
            return out, ({"tools": tools} if tools else {})
        # The template knows no tools: describe them in the system message, and write calls
        # and results as text in the Hermes format.
        out: list[dict[str, Any]] = []
        for m in messages:
            if m["role"] == "assistant" and m.get("tool_calls"):
                calls = "\n".join(_hermes_block(c) for c in m["tool_calls"])
                text = m.get("content") or ""
                out.append({"role": "assistant", "content": f"{text}\n{calls}".strip()})
            elif m["role"] == "tool":
                block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
                if out and out[-1].get("_tool_results"):
                    out[-1]["content"] += "\n" + block
                else:
                    out.append({"role": "user", "content": block, "_tool_results": True})
            else:
                out.append(dict(m))
        for m in out:
            m.pop("_tool_results", None)
        if tools:
            listing = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
            system = HERMES_SYSTEM.format(tools=listing)
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{system}"}
            else:
                out.insert(0, {"role": "system", "content": system})
        return out, {}

    # -- grammars ---------------------------------------------------------------------------

    def calls_grammar(
        self, tools: list[dict[str, Any]], parallel: bool, tokenizer: Tokenizer
    ) -> tuple[str, str]:
        """Lark rules for one or more calls of `tools` ({"name", "parameters"} each):
        (the rule's name, the rules' text)."""
        repeat = ' ("\\n" call)*' if parallel and self.name == "hermes" else ""
        if self.name == "hermes":
            schema = {"anyOf": [_hermes_schema(t) for t in tools]}
            body = f"hermes_body: {json_schema_lark(schema)}\n"
            call = 'call: "<tool_call>\\n" hermes_body "\\n</tool_call>"\n'
            return "calls", f"calls: call{repeat}\n{call}{body}"
        markers = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)
        tok = {m: _special(tokenizer, m) for m in markers}
        rules, names = [], []
        for i, t in enumerate(tools):
            args = json_schema_lark(t.get("parameters") or {"type": "object"})
            name = json.dumps(t["name"])
            if self.name == "deepseek_v3":
                head = f'{tok[CALL_BEGIN]} "function" {tok[SEP]} {name} "\\n```json\\n"'
                rules.append(f'call{i}: {head} args{i} "\\n```" {tok[CALL_END]}')
            else:
                head = f"{tok[CALL_BEGIN]} {name} {tok[SEP]}"
                rules.append(f"call{i}: {head} args{i} {tok[CALL_END]}")
            rules.append(f"args{i}: {args}")
            names.append(f"call{i}")
        many = "call+" if parallel else "call"
        head = f"calls: {tok[CALLS_BEGIN]} {many} {tok[CALLS_END]}\ncall: {' | '.join(names)}\n"
        return "calls", head + "\n".join(rules) + "\n"


def _special(tokenizer: Tokenizer, marker: str) -> str:
    token_id = tokenizer.token_id(marker)
    return f"<[{token_id}]>" if token_id is not None else json.dumps(marker)


def _hermes_schema(tool: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool["name"]},
            "arguments": tool.get("parameters") or {"type": "object"},
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _hermes_block(call: dict[str, Any]) -> str:
    fn = call.get("function", call)
    body = {"name": fn.get("name"), "arguments": _parsed(fn.get("arguments"))}
    return f"<tool_call>\n{json.dumps(body, ensure_ascii=False)}\n</tool_call>"


def _parsed(arguments: Any) -> Any:
    """OpenAI sends arguments as JSON text; templates expect the object."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _with_parsed_arguments(m: dict[str, Any]) -> dict[str, Any]:
    if not m.get("tool_calls"):
        return m
    calls = []
    for c in m["tool_calls"]:
        fn = c.get("function", {})
        calls.append({**c, "function": {**fn, "arguments": _parsed(fn.get("arguments"))}})
    return {**m, "tool_calls": calls}


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


class ToolCallParser:
    """Reads tool calls out of streamed content: text before the first call passes through;
    from the first marker on, text is held until a call is complete, then handed out as a
    ToolCall. What never became a call is handed back as content at the end.

    Small models often write a call without its markers, as a bare JSON object (or one in a
    ```json block) that names one of the tools: an answer that opens with `{` or a code fence
    (or a list) is held to the end, and is a call if it parses as one (`names`: the tools
    offered)."""

    def __init__(self, fmt: ToolFormat, names: tuple[str, ...] = ()):
        self.fmt, self.names = fmt, names
        self._held = ""
        self._in_calls = False
        self._bare: bool | None = None if names else False  # None: not yet known
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """The content this delta settles, and the calls it completed."""
        self._held += delta
        content = ""
        if not self._in_calls:
            start = self.fmt.region_start
            i = self._held.find(start)
            if self._bare is None and (text := self._held.lstrip()):
                self._bare = text.startswith(("{", "[", "```")) or "```".startswith(text)
            if i < 0:
                if self._bare is not False:
                    return "", []  # held to the end: it may be a bare call
                cut = len(self._held) - partial_tag_len(self._held, start)
                content, self._held = self._held[:cut], self._held[cut:]
                return content, []
            content, self._held = self._held[:i], self._held[i:]
            self._in_calls = True
        calls = []
        end = self.fmt.call_end
        while (j := self._held.find(end)) >= 0:
            chunk, self._held = self._held[:j], self._held[j + len(end) :]
            call = self.fmt.parse_call(chunk)
            if call is not None:
                calls.append(call)
            elif chunk.strip():
                content += chunk + end  # not a call after all: the model's own text
        self.calls += calls
        return content, calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The output ended. Stray text is content; a call that max_tokens cut off is
        dropped (finish_reason "length" says so), for it would not parse."""
        held, self._held = self._held, ""
        if not self._in_calls:
            calls = self._bare_calls(held) if self._bare else []
            self.calls += calls
            return ("" if calls else held), calls
        if (call := self.fmt.parse_call(held)) is not None:
            self.calls.append(call)
            return "", [call]
        tail = held.replace(CALLS_END, "")
        unfinished = tail.lstrip().startswith(("<tool_call>", CALL_BEGIN, CALLS_BEGIN))
        return ("" if unfinished or not tail.strip() else tail), []

    def _bare_calls(self, text: str) -> list[ToolCall]:
        """`{"name": ..., "arguments": ...}` (or a list of them), fenced or not, naming offered
        tools; [] if the text is anything else."""
        text = text.strip()
        if text.startswith("```"):
            text = text.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            return []
        calls = []
        for item in body if isinstance(body, list) else [body]:
            if not isinstance(item, dict) or item.get("name") not in self.names:
                return []
            args = item.get("arguments", item.get("parameters", {}))
            if not isinstance(args, dict | str):
                return []
            calls.append(ToolCall(item["name"], _arguments_text(args)))
        return calls
