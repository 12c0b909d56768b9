"""The OpenAI request shapes, validated with pydantic, and the error type every route answers with.

Leniency follows OpenAI's own API: `null` stands for the default wherever a field may be
omitted, and fields OpenAI defines that change nothing here (`metadata`, `store`,
`service_tier`, ...: IGNORED) are accepted and ignored. Types are strict (no "1" for 1), and an
unknown field is refused (as OpenAI does): a typo gets a clear 400 instead of silently doing
nothing. Every malformed request is a 400, which the openai SDK raises as BadRequestError.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "invalid_request_error",
        415: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
        503: "server_error",
    }

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class Lenient(Strict):
    """An OpenAI object: null is the same as leaving a field out."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


# OpenAI fields accepted and ignored: they ask for storage, billing, logging or modalities this
# server does not have, and change nothing about the tokens generated. (README: "Fields".)
IGNORED = frozenset(
    {
        "metadata", "store", "service_tier", "prediction", "modalities", "audio",
        "web_search_options", "reasoning_effort", "verbosity", "prompt_cache_key",
        "prompt_cache_retention", "safety_identifier", "user",
    }
)  # fmt: skip


class OpenAIRequest(Lenient):
    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in IGNORED}
        return data


class StreamOptions(Lenient):
    include_usage: bool = False


class ContentPart(Lenient):
    model_config = ConfigDict(extra="allow", strict=True)  # image_url etc.: refused by type
    type: str
    text: str | None = None


class FunctionCall(Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallMessage(Lenient):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None  # accepted from clients that echo it; never fed back
    reasoning: str | None = None  # the same, under the name some clients use
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallMessage] | None = None
    refusal: str | None = None  # echoed back by clients; never fed back
    audio: dict[str, Any] | None = None  # the same
    function_call: dict[str, Any] | None = None  # OpenAI's legacy field; the same


class FunctionDefinition(Lenient):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(Lenient):
    name: str


class NamedToolChoice(Lenient):
    type: Literal["function"]
    function: ToolChoiceFunction


class JsonSchemaFormat(Lenient):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(Lenient):
    """Beyond OpenAI, as vLLM: exactly one of these constrains the output."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    grammar: str | None = None  # Lark, or GBNF as llama.cpp writes it
    choice: list[str] | None = None
    json_object: bool | None = None


class ScalingOptions(Strict):
    """`test_time_scaling`: thrifty.tts.TTSConfig's fields, by type; unset ones come from the
    request's own sampling fields where it has them, else from TTSConfig's defaults."""

    strategy: Literal["greedy", "self-consistency", "adaptive", "deepconf", "best-of-n"] = (
        "self-consistency"
    )
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    wave: int | None = None
    confidence: float | None = None
    stopping_rule: Literal["beta", "dirichlet", "predictive"] | None = None
    warmup: int | None = None
    keep: float | None = None
    window: int | None = None
    top_logprobs: int | None = None
    early_stop: bool | None = None
    consensus: float | None = None
    deepconf_stop: Literal["consensus", "adaptive"] | None = None
    symbolic: bool | None = None
    numeric: bool | None = None
    max_thinking_tokens: int | None = Field(None, ge=0)
    min_thinking_tokens: int | None = Field(None, ge=0)


class SamplingRequest(OpenAIRequest):
    """Fields shared by chat and text completions."""

    model: str | None = None  # None: the served model
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # beyond OpenAI, as vLLM: 0 is off
    ignore_eos: bool = False  # beyond OpenAI, as vLLM: generate max_tokens (for benchmarks)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    test_time_scaling: ScalingOptions | None = None  # beyond OpenAI: thrifty/server/scaling.py
    logit_bias: dict[str, float] | None = None  # token id (as text) -> added to its logit
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="before")
    @classmethod
    def _guided_aliases(cls, data: Any) -> Any:
        """vLLM's older guided_json / guided_regex / guided_grammar / guided_choice fields."""
        if isinstance(data, dict) and any(k.startswith("guided_") for k in data):
            data = dict(data)
            found = {}
            for key in ("json", "regex", "grammar", "choice"):
                value = data.pop(f"guided_{key}", None)
                if value is not None:
                    found[key] = value
            if found:
                data.setdefault("structured_outputs", found)
        return data


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    # Beyond OpenAI, for <think> models: the reasoning is closed after at most this many tokens
    # (and, before the minimum, an early close is replaced by "Wait"); thrifty.tts.ThinkingBudget.
    max_thinking_tokens: int | None = Field(None, ge=0)
    min_thinking_tokens: int | None = Field(None, ge=0)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False  # the prompt's text before each completion


def parse(model: type[Strict], body: str) -> Any:
    """Validate a JSON body: malformed JSON or a body of the wrong shape is a 400."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {first['msg']}") from None
        loc = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"unrecognized request argument: {loc}", param=loc) from None
        where = f"{loc}: " if loc else ""
        raise ApiError(400, f"{where}{first['msg']}", param=loc) from None
