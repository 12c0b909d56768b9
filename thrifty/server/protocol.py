"""The OpenAI request shapes, validated with pydantic, and the error type every route answers with.

Requests are validated strictly (no "1" for 1, no unknown fields): a typo or an unsupported
option gets a clear 422 instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "invalid_request_error",
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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None  # accepted from clients that echo it; never fed back
    name: str | None = None
    tool_call_id: str | None = None


class ScalingOptions(_Strict):
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


class SamplingRequest(_Strict):
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


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
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


def parse(model: type[_Strict], body: str) -> Any:
    """Validate a JSON body: malformed JSON is a 400, a body of the wrong shape a 422."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {first['msg']}") from None
        loc = ".".join(str(p) for p in first["loc"]) or None
        where = f"{loc}: " if loc else ""
        raise ApiError(422, f"{where}{first['msg']}", param=loc) from None
