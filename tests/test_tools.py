"""Tool calls without a model: formats detected from templates, calls parsed out of streamed
text in every format (split at every character), prompts for templates that know no tools, and
the grammars that force a call, checked by llguidance against well-formed and malformed calls."""

from __future__ import annotations

import json

import pytest
from llguidance import LLMatcher, LLTokenizer

from thrifty.server.tools import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    SEP,
    ToolCallParser,
    ToolFormat,
)

HERMES = ToolFormat("hermes", True)
V3 = ToolFormat("deepseek_v3", True)
V31 = ToolFormat("deepseek_v31", True)
WEATHER = {
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}


def v3_call(name: str, args: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


def v31_call(name: str, args: str) -> str:
    return f"{CALL_BEGIN}{name}{SEP}{args}{CALL_END}"


PARIS = '{"city": "Paris"}'
CASES = [
    (
        HERMES,
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me check.\n",
    ),
    (
        V3,
        f"Sure.{CALLS_BEGIN}{v3_call('get_weather', PARIS)}{v3_call('get_time', '{}')}{CALLS_END}",
        "Sure.",
    ),
    (
        V31,
        f"{CALLS_BEGIN}{v31_call('get_weather', PARIS)}{v31_call('get_time', '{}')}{CALLS_END}",
        "",
    ),
]


@pytest.mark.parametrize(("fmt", "text", "content"), CASES)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_calls_are_parsed_from_streamed_text(fmt, text, content, step):
    parser = ToolCallParser(fmt)
    got_content, calls = "", []
    for i in range(0, len(text), step):
        c, new = parser.feed(text[i : i + step])
        got_content += c
        calls += new
    c, new = parser.finish()
    got_content, calls = got_content + c, calls + new
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_text_that_is_not_a_call_stays_content():
    parser = ToolCallParser(HERMES)
    text = "Use <tool_call> tags like <tool_call>not json</tool_call> ok"
    content, calls = parser.feed(text)
    tail, more = parser.finish()
    assert calls == more == []
    assert content + tail == text
    cut = ToolCallParser(HERMES)  # max_tokens cut the call off: dropped, not shown as text
    content, _ = cut.feed('Hi <tool_call>\n{"name": "get_weather", "argu')
    assert content == "Hi " and cut.finish() == ("", [])


def test_format_is_detected_from_the_template():
    assert ToolFormat.detect("{{ messages }}") == ToolFormat("hermes", False)
    assert ToolFormat.detect("{% if tools %}<tool_call>{% endif %}") == HERMES
    v3 = (
        "{{'<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name']"
        " + '\\n' + '```json' + '\\n' + tool['function']['arguments']}}"
    )
    assert ToolFormat.detect(v3 + "{{ tools }}").name == "deepseek_v3"
    v31 = "{{'<｜tool▁call▁begin｜>' + tool['function']['name'] + '<｜tool▁sep｜>'}}"
    assert ToolFormat.detect(v31 + "{{ tools }}").name == "deepseek_v31"


def test_templates_without_tools_get_them_in_the_system_message():
    fmt = ToolFormat("hermes", False)
    tools = [{"type": "function", "function": WEATHER}]
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}  # fmt: skip
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Rome and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call, {**call, "id": "c2"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
    ]
    out, kwargs = fmt.render(messages, tools)
    assert kwargs == {}
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(tools[0]) in out[0]["content"]
    assert out[2]["content"].count('{"name": "get_weather", "arguments": {"city": "Rome"}}') == 2
    assert out[3]["content"] == (
        "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
    )
    native, kwargs = HERMES.render(messages, tools)  # the template renders them itself
    assert kwargs == {"tools": tools}
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}
    deepseek, _ = V3.render(messages, tools)  # its template concatenates the JSON text
    assert deepseek[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Rome"}'


@pytest.fixture(scope="module")
def lltokenizer(smollm2_fp32):
    tok = smollm2_fp32.tokenizer
    return tok, LLTokenizer(tok.to_json(), eos_token=list(tok.eos_token_ids))


@pytest.mark.parametrize("fmt", [HERMES, V3, V31])
@pytest.mark.parametrize("parallel", [False, True])
def test_call_grammars_accept_calls_and_refuse_others(lltokenizer, fmt, parallel):
    tok, lltok = lltokenizer
    rule, rules = fmt.calls_grammar([WEATHER, TIME], parallel, tok)
    grammar = LLMatcher.grammar_from_lark(f"start: {rule}\n{rules}")
    assert not LLMatcher.validate_grammar(grammar, lltok)

    def accepts(text: str) -> bool:
        m = LLMatcher(lltok, grammar, log_level=0)
        ids = lltok.tokenize_str(text)
        return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()

    args = '{"city": "Paris", "days": 2}'
    if fmt is HERMES:
        one = f'<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call>'
        two = one + '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
        bad = [one.replace("get_weather", "get_wether"), one.replace('"Paris"', "3")]
    else:
        call = v3_call if fmt is V3 else v31_call
        one = f"{CALLS_BEGIN}{call('get_weather', args)}{CALLS_END}"
        two = f"{CALLS_BEGIN}{call('get_weather', args)}{call('get_time', '{}')}{CALLS_END}"
        bad = [one.replace("get_weather", "get_wether"), one.replace("Paris", "Paris\x01")]
    assert accepts(one)
    assert accepts(two) == parallel
    assert not any(accepts(b) for b in bad)


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
        '  [{"name": "get_weather", "parameters": {"city": "Paris"}}]',
    ],
)
def test_a_bare_call_naming_a_tool_is_a_call(text):
    """Small models (Qwen2.5-Coder-0.5B) often leave out the <tool_call> markers."""
    parser = ToolCallParser(HERMES, ("get_weather",))
    held = "".join(parser.feed(text[i : i + 2])[0] for i in range(0, len(text), 2))
    content, calls = parser.finish()
    assert held == content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_time", "arguments": {}}',  # not a tool offered
        '{"city": "Paris"}',  # JSON, but no call
        "```python\nprint(1)\n```",
    ],
)
def test_json_that_is_not_a_call_stays_content(text):
    parser = ToolCallParser(HERMES, ("get_weather",))
    held = "".join(parser.feed(c)[0] for c in text)
    content, calls = parser.finish()
    assert held == "" and content == text and calls == []
    plain = ToolCallParser(HERMES, ("get_weather",))  # prose streams as it comes
    assert plain.feed("The weather")[0] == "The weather"
