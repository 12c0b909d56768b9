"""`thrifty run` through a running server: the answer streamed.

As `ollama run` talks to `ollama serve`: the model stays loaded in `thrifty serve` (or any
OpenAI-compatible server), and `run` neither imports torch nor loads weights, so the first token
comes after one HTTP round trip and the server's prefill. `--url` names the server; without it,
`run` still answers through a `thrifty serve` on this machine that has the model loaded
(`local_server`). Standard library only: this module must not pull in the engine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from thrifty.errors import ThriftyError

TIMEOUT_S = 600.0  # a long answer on a slow CPU; the server's own limits apply first
# Where `thrifty serve` listens unless told otherwise, and so where `run` looks for one.
LOCAL_URL_ENV, LOCAL_URL = "THRIFTY_LOCAL_URL", "http://127.0.0.1:8000"
PROBE_TIMEOUT_S = 1.0  # a local server answers its status in milliseconds


def _opener(url: str):
    """urlopen, without the environment's HTTP proxy for a loopback address (a proxy cannot
    reach this machine's own server)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return urllib.request.build_opener(urllib.request.ProxyHandler({})).open
    return urllib.request.urlopen


class Server:
    """One OpenAI-compatible server at `url` (scheme, host, port; a trailing /v1 is allowed)."""

    def __init__(self, url: str, api_key: str | None = None):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key
        self._open = _opener(self.url)

    def _request(
        self, path: str, body: dict[str, Any] | None = None, timeout: float = TIMEOUT_S
    ) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            return self._open(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise ThriftyError(f"{self.url}: {_error_message(e)}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ThriftyError(
                f"no server at {self.url} ({reason}); start one: thrifty serve"
            ) from None

    def models(self) -> list[str]:
        """The ids /v1/models lists."""
        with self._request("/v1/models") as response:
            return [m["id"] for m in json.load(response).get("data", [])]

    def model(self, wanted: str | None) -> str:
        """The model to ask for: `wanted` if the server serves it (refused by name if not), else
        the server's first."""
        served = self.models()
        if not served:
            raise ThriftyError(f"{self.url} serves no model")
        if wanted is None:
            return served[0]
        if wanted not in served:
            raise ThriftyError(
                f"{self.url} serves {', '.join(served)}, not {wanted}; run without --url to "
                "load it here"
            )
        return wanted

    def status(self) -> dict[str, Any]:
        """`thrifty serve`'s /thrifty/status: the loaded model, its path, the engine's load."""
        with self._request("/thrifty/status", timeout=PROBE_TIMEOUT_S) as response:
            return json.load(response)

    def stream(self, model: str, prompt: str | list[dict[str, str]], params: dict[str, Any]):
        """The answer's text deltas: a chat (messages) or a completion (raw text)."""
        chat = not isinstance(prompt, str)
        body = {"model": model, "stream": True, **params}
        body["messages" if chat else "prompt"] = prompt
        path = "/v1/chat/completions" if chat else "/v1/completions"
        with self._request(path, body) as response:
            yield from _deltas(response, chat)


# The SamplingParams fields a chat sends, by their OpenAI (and vLLM) request names.
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "seed")  # fmt: skip


class RemoteModel:
    """A model a server has loaded, as thrifty.chat.Chat uses an LLM: `stream(messages,
    params)` yields the answer's text deltas, and closing it ends the request there."""

    def __init__(self, server: Server, model: str):
        self.server, self.model = server, model
        self.location = f"{server.url} (a running server)"

    def stream(self, messages: list[dict[str, str]], params: Any) -> Iterator[str]:
        body = {k: getattr(params, k) for k in _SAMPLING_FIELDS if getattr(params, k) is not None}
        yield from self.server.stream(self.model, messages, body)


def local_server(model: str, api_key: str | None) -> Server | None:
    """The `thrifty serve` at $THRIFTY_LOCAL_URL (default: serve's own address) if it has
    `model` (a registry name or hub id, as serve names it) loaded, else None: `thrifty run` then
    answers through it instead of loading the model a second time. Anything else there (no
    server, another model, another program, a key it refuses) means None, in about a
    millisecond where nothing listens."""
    server = Server(os.environ.get(LOCAL_URL_ENV) or LOCAL_URL, api_key)
    try:
        status = server.status()
    except (ThriftyError, ValueError, OSError):
        return None
    return server if isinstance(status, dict) and status.get("model") == model else None


def _deltas(lines, chat: bool) -> Iterator[str]:
    """The text of each server-sent event until [DONE]; an error event is raised."""
    for raw in lines:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line.removeprefix(b"data:").strip()
        if data == b"[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise ThriftyError(f"the server stopped the answer: {event['error'].get('message')}")
        for choice in event.get("choices", []):
            text = choice.get("delta", {}).get("content") if chat else choice.get("text")
            if text:
                yield text


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        return f"{e.code}: {json.loads(e.read())['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{e.code} {e.reason}"
