"""Applications against a real `thrifty serve` (SmolLM2) over a socket, through the clients they
use: the openai SDK (tool-call loop, structured output, the Responses API, lenient fields) and
LangChain (`with_structured_output` by every method, `bind_tools`, the Responses API).

A 135M model is not asked to be clever: where a call or a document must come out, the grammar
guarantees it, and the tests check that it parses and matches its schema.
"""

from __future__ import annotations

import json

import httpx2 as httpx
import jsonschema
import openai
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field
from test_server import KEY, MODEL, openai_client, suite_server, wait_idle

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def url(smollm2_gguf):
    with suite_server() as url:
        yield url
        wait_idle(url)  # nothing held once every test is done


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai_client(url)


def check_call(call, tool: dict) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_tool_call_loop(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
        max_tokens=160, temperature=0,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and all(c.function.name in ("get_weather", "get_time") for c in calls)
    weather = [c for c in calls if c.function.name == "get_weather"] or calls[:1]
    check_call(weather[0], WEATHER if weather[0].function.name == "get_weather" else TIME)
    # The result goes back as a tool message; the model answers in text.
    follow = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        *({"role": "tool", "tool_call_id": c.id, "content": "Sunny, 21 C"} for c in calls),
    ]
    r2 = client.chat.completions.create(
        model=MODEL, messages=follow, tools=[WEATHER, TIME], tool_choice="none", max_tokens=16
    )
    assert r2.choices[0].message.content and not r2.choices[0].message.tool_calls
    # The calls and results reached the prompt: it is longer than the question alone by at
    # least the results' text.
    r3 = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    assert r2.usage.prompt_tokens > r3.usage.prompt_tokens + 10 * len(calls)


def test_named_tool_streamed_is_one_call(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[TIME, WEATHER], max_tokens=96, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0,
    )  # fmt: skip
    deltas, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            deltas += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and len(deltas) == 1 and deltas[0].index == 0
    args = json.loads(deltas[0].function.arguments)
    assert deltas[0].function.name == "get_weather" and set(args) == {"city", "unit"}


def test_structured_output(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        max_tokens=64, n=3, temperature=1.0, seed=5,
    )  # fmt: skip
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)
    extra = [
        ({"regex": "[0-9]{3}-[0-9]{4}"}, lambda t: len(t) == 8 and t[3] == "-"),
        ({"choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"grammar": 'root ::= "ab" [0-9]'}, lambda t: t[:2] == "ab" and t[2].isdigit()),
    ]
    for so, ok in extra:
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=16, extra_body={"structured_outputs": so}
        )
        assert ok(r.choices[0].message.content), (so, r.choices[0].message.content)
    r = client.completions.create(
        model=MODEL, prompt="Answer:", max_tokens=8, extra_body={"guided_choice": ["A", "B"]}
    )
    assert r.choices[0].text in ("A", "B")


def test_lenient_fields_and_clear_errors(client, url):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=4, tools=[], tool_choice="none",
        response_format={"type": "text"}, metadata={"k": "v"}, store=False,
        parallel_tool_calls=True, logit_bias={}, service_tier="auto", user="u1",
        extra_body={"temperature": None, "top_p": None, "n": None, "presence_penalty": None,
                    "frequency_penalty": None, "logprobs": None, "stream": None, "stop": None},
    )  # fmt: skip
    assert r.choices[0].message.content is not None
    bad = [
        (dict(extra_body={"temprature": 0}), "temprature"),
        (dict(response_format={"type": "json_schema",
                               "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
         "response_format"),
        (dict(extra_body={"structured_outputs": {"regex": "[a-"}}), "response_format"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "zzz"}}),
         "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(logit_bias={"999999999": 1}), "logit_bias"),
        (dict(logit_bias={"5": 101}), None),
    ]  # fmt: skip
    for stream in (False, True):  # an invalid grammar is a 400 before any stream begins
        for kwargs, param in bad:
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4,
                                               stream=stream, **kwargs)  # fmt: skip
            assert param is None or e.value.body["param"] == param, e.value.body
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    r = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=3, echo=True)
    assert r.choices[0].text.startswith("The sea is") and len(r.choices[0].text) > 10
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": ASK, "max_tokens": 2, "store": None}
    reply = httpx.post(f"{url}/v1/chat/completions", headers=auth, json=body, timeout=60)
    assert reply.status_code == 200


def test_responses_api(client):
    r = client.responses.create(
        model=MODEL, input="What is the capital of France?", instructions="Answer in one word.",
        max_output_tokens=16, temperature=0,
    )  # fmt: skip
    assert r.status in ("completed", "incomplete") and r.output_text
    assert r.usage.input_tokens > 10 and r.usage.output_tokens > 0
    tools = [{"type": "function", **WEATHER["function"]}]
    r = client.responses.create(model=MODEL, input=ASK, tools=tools, tool_choice="required",
                                max_output_tokens=96, temperature=0)  # fmt: skip
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and json.loads(calls[0].arguments)["city"]
    history = [*ASK, *(c.model_dump(exclude_none=True) for c in calls)]
    history += [{"type": "function_call_output", "call_id": c.call_id, "output": "Sunny"}
                for c in calls]  # fmt: skip
    r2 = client.responses.create(model=MODEL, input=history, tools=tools, tool_choice="none",
                                 max_output_tokens=12, temperature=0)  # fmt: skip
    alone = client.responses.create(model=MODEL, input=ASK, max_output_tokens=1)
    assert r2.output_text and r2.usage.input_tokens > alone.usage.input_tokens + 10
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    r = client.responses.create(model=MODEL, input="A person, as JSON", text={"format": fmt},
                                max_output_tokens=64, temperature=0)  # fmt: skip
    jsonschema.validate(json.loads(r.output_text), PERSON)
    stream = client.responses.create(model=MODEL, input=ASK, tools=tools, stream=True,
                                     tool_choice="required", max_output_tokens=96,
                                     temperature=0)  # fmt: skip
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in done] == [i.type for i in events[-1].response.output]
    assert any(i.type == "function_call" and i.name == "get_weather" for i in done)
    with client.responses.stream(model=MODEL, input="Say hello.", max_output_tokens=48,
                                 temperature=0) as s:  # fmt: skip
        events = list(s)  # the last is response.completed, or .incomplete if 48 ran out
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert events[-1].response.output_text == text and text
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_1")
    assert e.value.body["param"] == "previous_response_id"


class Person(BaseModel):
    """A person."""

    name: str = Field(description="the person's name", max_length=30)
    age: int


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return "sunny"


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_structured_output(url, method):
    llm = ChatOpenAI(base_url=f"{url}/v1", api_key=KEY, model=MODEL, temperature=0,
                     max_tokens=96, max_retries=0)  # fmt: skip
    ask = "Describe a person named Ann, aged 31, as JSON with keys name and age."
    out = llm.with_structured_output(Person, method=method, include_raw=True).invoke(ask)
    assert out["parsing_error"] is None and isinstance(out["parsed"], Person), out


def test_langchain_tools(url):
    llm = ChatOpenAI(base_url=f"{url}/v1", api_key=KEY, model=MODEL, temperature=0,
                     max_tokens=96, max_retries=0)  # fmt: skip
    for choice in ("any", "get_weather"):
        message = llm.bind_tools([get_weather], tool_choice=choice).invoke("Weather in Paris?")
        assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
        assert isinstance(message.tool_calls[0]["args"]["city"], str)
    chunks = list(llm.bind_tools([get_weather], tool_choice="get_weather").stream("Rome?"))
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert [c["name"] for c in merged.tool_calls] == ["get_weather"]
    via_responses = ChatOpenAI(base_url=f"{url}/v1", api_key=KEY, model=MODEL, temperature=0,
                               max_tokens=96, max_retries=0, use_responses_api=True)  # fmt: skip
    message = via_responses.bind_tools([get_weather], tool_choice="any").invoke("Paris?")
    assert message.tool_calls[0]["name"] == "get_weather"
    person = via_responses.with_structured_output(Person, method="json_schema").invoke("Ann, 31")
    assert isinstance(person, Person)
