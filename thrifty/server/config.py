"""The server's own options: what `thrifty serve` adds on top of the EngineConfig."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    model_name: str  # the one model id served; requests naming another get a 404
    api_key: str | None = None  # None: no authentication
    max_body_bytes: int = 4 << 20  # 413 above this
    max_n: int = 16  # samples per request
    max_queued_requests: int = 256  # completions waiting for their first token; 429 above this
    allowed_origins: tuple[str, ...] = ()  # web origins whose pages may call the API (CORS)
    access_log: bool = True  # one line per request on stdout
    keep_alive_s: float | None = None  # stop after this long with no request; None: never
