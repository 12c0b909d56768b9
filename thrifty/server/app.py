"""The ASGI app: routes, authentication, body limits, OpenAI-style errors, and `serve()`.

Every error, whatever raised it (validation, a limit, an unknown route), is answered as
`{"error": {"message", "type", "param", "code"}}`. Bodies are read by hand, under a size limit,
so that bad bytes and bad JSON get their own clear 400s.
"""

from __future__ import annotations

import contextlib
import hmac
import socket
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from thrifty.engine.llm_engine import LLMEngine
from thrifty.errors import ThriftyError
from thrifty.generation_defaults import GenerationDefaults
from thrifty.server.async_engine import AsyncEngine, EngineThread
from thrifty.server.config import ServerConfig
from thrifty.server.generation import Generation
from thrifty.server.metrics import Metrics
from thrifty.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse
from thrifty.server.responses import Responses
from thrifty.server.responses_api import ResponsesApi, ResponsesRequest, to_chat
from thrifty.server.scaling import ScalingRun
from thrifty.server.serving import Serving
from thrifty.server.status import Status

STATIC = Path(__file__).parent / "static"
T = TypeVar("T")
ROUTES = (
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/health",
    "/metrics", "/", "/thrifty/status", "/static/chat.js", "/static/marked.min.js",
    "/static/purify.min.js",
)  # fmt: skip


def create_app(
    engine: LLMEngine, config: ServerConfig, thread: EngineThread | None = None
) -> FastAPI:
    """The app, its engine loop on `thread` (the one the engine was loaded on) or a new one."""
    async_engine = AsyncEngine(engine, thread)
    metrics = Metrics(engine)
    defaults = GenerationDefaults.from_dir(engine.path)
    serving = Serving(
        async_engine,
        engine.tokenizer,
        engine.max_model_len,
        config,
        metrics,
        engine.grammars,
        defaults,
    )
    status = Status(engine, config.model_name, defaults)
    responses = Responses(engine.tokenizer, config.model_name)
    responses_api = ResponsesApi(engine.tokenizer, config.model_name, defaults)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        yield
        async_engine.stop()

    app = FastAPI(
        title="thrifty", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.engine_loop = async_engine

    def authenticate(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {config.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")  # fmt: skip

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)])

    async def scaled(request: Request, run: ScalingRun, stream: bool, usage: bool) -> Response:
        """Answer a request that asked for test_time_scaling: one job, one chosen answer."""
        run.start()
        if stream:
            return EventStream(run.stream(config.model_name, usage), run.abort)
        try:
            return await until_disconnect(request, run.full(config.model_name))
        finally:
            run.abort()  # frees the blocks at once if the client left; else a no-op

    card = {"id": config.model_name, "object": "model", "created": started,
            "owned_by": "thrifty", "max_model_len": engine.max_model_len}  # fmt: skip

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != config.model_name:
            raise ApiError(
                404,
                f"the model {model_id!r} does not exist; this server serves {config.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return card

    # Rendering templates, tokenizing prompts and compiling grammars take time in proportion
    # to the request (seconds for megabytes): they run on worker threads, a few at a time, so
    # that the event loop keeps answering everyone else.
    preparing = anyio.CapacityLimiter(2)

    async def off_loop(work: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(work, *args, limiter=preparing)

    async def checked(gen: Generation) -> Generation:
        """The request's grammar compiled off the event loop (a 400 if it is invalid)."""
        constraint = gen.params[0].constraint
        if constraint is not None:
            await off_loop(serving.check_constraint, constraint)
        return gen

    @v1.post("/chat/completions")
    async def chat(request: Request) -> Response:
        req = parse(ChatCompletionRequest, await read_body(request, config.max_body_bytes))
        usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.test_time_scaling is not None:
            return await scaled(request, await off_loop(serving.chat_scaling, req), req.stream,
                                usage)  # fmt: skip
        gen, parsers = await off_loop(serving.chat, req)
        (await checked(gen)).start(parsers)
        if req.stream:
            return EventStream(responses.chat_stream(gen, req.logprobs, usage), gen.abort)
        try:
            return await until_disconnect(request, responses.chat_full(gen, req.logprobs))
        finally:
            gen.abort()  # frees the blocks at once if the client left; else a no-op

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await read_body(request, config.max_body_bytes))
        usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.test_time_scaling is not None:
            run = await off_loop(serving.completion_scaling, req)
            return await scaled(request, run, req.stream, usage)
        gen = await checked(await off_loop(serving.completion, req))
        gen.start()
        want = req.logprobs is not None
        if req.stream:
            return EventStream(responses.completion_stream(gen, want, usage, req.echo), gen.abort)
        try:
            return await until_disconnect(request, responses.completion_full(gen, want, req.echo))
        finally:
            gen.abort()

    @v1.post("/responses")
    async def responses_route(request: Request) -> Response:
        req = parse(ResponsesRequest, await read_body(request, config.max_body_bytes))
        gen, parsers = await off_loop(serving.chat, to_chat(req))
        (await checked(gen)).start(parsers)
        if req.stream:
            return EventStream(responses_api.stream(req, gen), gen.abort)
        try:
            return await until_disconnect(request, responses_api.full(req, gen))
        finally:
            gen.abort()

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.alive:
            return error_response(ApiError(503, "the engine is not running"))
        return JSONResponse({"status": "ok"})

    @app.get("/thrifty/status", dependencies=[Depends(authenticate)])
    async def status_route() -> dict[str, Any]:
        return status.read()  # `thrifty ps`

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in ("chat.js", "marked.min.js", "purify.min.js"):  # the chat page's scripts
            raise ApiError(404, f"no such file: {name}")
        return FileResponse(STATIC / name, media_type="text/javascript")

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError) -> Response:
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, e: HTTPException) -> Response:
        return error_response(ApiError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception) -> Response:
        traceback.print_exception(e)
        return error_response(ApiError(500, "internal server error"))

    # Browsers may call the API from the pages of --allowed-origins only; a preflight from any
    # other origin is answered 400, and its page cannot read what a simple request returns.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(config.allowed_origins),
        allow_methods=["GET", "POST"],
        allow_headers=["authorization", "content-type"],
    )
    app.add_middleware(CountRequests, metrics=metrics)
    if config.access_log:
        app.add_middleware(AccessLog)
    return app


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def read_body(request: Request, limit: int) -> str:
    """The body as text: 415 unless it is declared JSON, 413 past `limit` bytes, 400 if it is
    not UTF-8.

    A web page can send a text/plain POST to any origin without asking first (no CORS
    preflight); requiring application/json makes the browser ask, and --allowed-origins
    decides."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"the body must be JSON sent as Content-Type: application/json"
                       f" (got {kind or 'none'})")  # fmt: skip
    too_big = ApiError(413, f"the request body is over {limit} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not valid UTF-8 (bad byte at offset {e.start})") from None


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[dict[str, Any]]) -> Response:
    """Await a full (non-streamed) answer; give up on it if the client goes away meanwhile."""
    result: dict[str, Any] | None = None
    error: Exception | None = None

    async def run() -> None:
        nonlocal result, error
        try:
            result = await work
        except Exception as e:  # re-raised below, outside the task group's exception group
            error = e
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await _wait_disconnect(request.receive)
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    if result is None:  # the client left; nobody reads this
        return Response(status_code=499)
    return JSONResponse(result)


class EventStream(StreamingResponse):
    """Server-sent events that stop, and close their generator, the moment the client leaves.

    (Starlette alone notices a disconnect only at the next write, which may be far off while a
    request waits in the queue.)
    """

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.events, self.on_close = events, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client left mid-write
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await _wait_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.events.aclose()  # type: ignore[attr-defined]
            self.on_close()  # even if the stream never started


class CountRequests:
    """ASGI middleware: count responses by route and status (streams stay untouched)."""

    def __init__(self, app: Callable, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class AccessLog:
    """ASGI middleware: one line per request on stdout once its response has ended (a stream
    at its last byte): client, method, path, status, seconds."""

    def __init__(self, app: Callable):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.monotonic(), 0

        async def logging_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, logging_send)
        finally:
            client = scope.get("client") or ("-", 0)
            when = time.strftime("%Y-%m-%d %H:%M:%S")
            print(f'{when} {client[0]} "{scope["method"]} {scope["path"]}" {status or "-"}'
                  f" {time.monotonic() - t0:.3f} s", flush=True)  # fmt: skip


class Activity:
    """ASGI middleware: HTTP requests in flight and when the last one ended, for --keep-alive
    (a stream counts until its last byte; a monitor's /health and /metrics do not count)."""

    PROBES = ("/health", "/metrics")

    def __init__(self, app: Callable):
        self.app = app
        self.in_flight = 0
        self.last = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.PROBES:
            await self.app(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.last = time.monotonic()

    def idle_s(self) -> float:
        """Seconds since the last request ended; 0 while one runs."""
        return 0.0 if self.in_flight else time.monotonic() - self.last


def check_address(host: str, port: int) -> None:
    """Fail before loading a model if the address cannot be served on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(infos[0][4])
    except OSError as e:
        raise ThriftyError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def serve(load: Callable[[], LLMEngine], config: ServerConfig, host: str, port: int) -> None:
    """Load the engine with `load` on the thread that will run it, then serve until interrupted."""
    import uvicorn

    def ready() -> LLMEngine:
        engine = load()
        # Touch every KV-cache page now: the prefix cache's LRU reuse walks the whole cache over
        # time, so a long-running server would reach this footprint anyway; this way its memory
        # is steady from the start and a short machine fails here, not under load.
        engine.runner.kv_cache.zero_()
        return engine

    thread = EngineThread()
    engine = thread.call(ready).result()
    app = create_app(engine, config, thread)
    if config.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"thrifty: warning: {host} is reachable from other machines and no --api-key is"
              " set: anyone who can reach it can use it", file=sys.stderr)  # fmt: skip
    print(f"thrifty: serving {config.model_name} on http://{host}:{port}", flush=True)
    # Requests are counted only where --keep-alive needs it.
    activity = Activity(app) if config.keep_alive_s is not None else None
    server = uvicorn.Server(
        uvicorn.Config(
            activity or app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5
        )
    )
    if activity is not None:

        def stop_when_idle() -> None:
            while not server.should_exit:
                time.sleep(min(0.5, config.keep_alive_s))
                if activity.idle_s() >= config.keep_alive_s:
                    print(f"thrifty: no request for {config.keep_alive_s:g} s, stopping",
                          flush=True)  # fmt: skip
                    server.should_exit = True

        threading.Thread(target=stop_when_idle, name="keep-alive", daemon=True).start()
    handle_exit = server.handle_exit

    def on_signal(sig: int, frame: Any) -> None:  # Ctrl-C: end open streams, then stop
        app.state.engine_loop.close()
        handle_exit(sig, frame)

    server.handle_exit = on_signal  # type: ignore[method-assign]
    server.run()
