"""Command line: `thrifty pull | run | chat | models | show | rm | ps | serve | quantize | eval`.

Flags map one to one onto config fields.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any

from thrifty.errors import ThriftyError
from thrifty.generation_defaults import GenerationDefaults
from thrifty.tts import cli as tts_cli


def _int_in(low: int, high: int | None, what: str):
    """An argparse type: an integer from `low` to `high`, refused at parsing otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


_port = _int_in(0, 65535, "0 to 65535")
_positive = _int_in(1, None, "positive")
_UNITS = {"s": 1, "m": 60, "h": 3600}


def _duration(text: str) -> float:
    """An argparse type: seconds from 90, 90s, 5m or 1.5h (0: off)."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 90s, 5m or 1h, got {text!r}"
        ) from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text!r}")
    return value


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        default="auto",
        help="activations (and dense weights): bfloat16, float32, float16, or auto (default):"
        " bfloat16, but float32 for a GGUF model on a CPU without AVX-512 BF16",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, ...")
    p.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "bfloat16", "float32", "float16"],
        default="auto",
        help="the KV cache's dtype; auto (default): the activations', but bfloat16 where --dtype"
        " auto chose float32 activations (a GGUF model on a CPU without AVX-512 BF16): half"
        " float32's memory and decode attention's reads",
    )
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow loading pickled .bin/.pt weights (unpickling can run code)",
    )
    p.add_argument(
        "--quantization",
        choices=["fp8", "fp8-all"],
        help="fp8: quantize linear weights on load to FP8 with 128x128 UE8M0 block scales "
        "(embeddings, norms and lm_head stay in high precision, as in DeepSeek's checkpoints); "
        "fp8-all: an untied lm_head too",
    )
    p.add_argument(
        "--chat-template",
        help="a Jinja chat template (a file, or the template itself) instead of the model's",
    )


_DEFAULTS = GenerationDefaults()
SAMPLING_HELP = (
    "Sampling defaults: the model's generation_config.json where it sets them (`thrifty show"
    f" MODEL` says), else {_DEFAULTS.describe()}."
)


def _add_parallel_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tensor-parallel-size",
        type=_positive,
        help="ranks that split the model (tensor parallel; MoE experts: expert parallel); more"
        " than 1 spawns the others on this machine, or joins torchrun's (default 1)",
    )


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    model = "default: the model's generation_config.json, else"
    p.add_argument("--max-tokens", type=int, default=512, help="(default 512)")
    p.add_argument(
        "--temperature", type=float, help=f"0 is greedy ({model} {_DEFAULTS.temperature})"
    )
    p.add_argument("--top-p", type=float, help=f"({model} {_DEFAULTS.top_p})")
    p.add_argument("--top-k", type=int, help=f"0 is off ({model} {_DEFAULTS.top_k})")
    p.add_argument("--min-p", type=float, default=0.0, help="(default 0: off)")
    p.add_argument(
        "--repetition-penalty", type=float, help=f"({model} {_DEFAULTS.repetition_penalty})"
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--num-threads", type=int, help="torch intra-op threads (default: torch's)")


def _add_local_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api-key",
        default=os.environ.get("THRIFTY_API_KEY"),
        help="the server's key (default: $THRIFTY_API_KEY)",
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="load the model here even where a thrifty serve on this machine has it loaded (at"
        " $THRIFTY_LOCAL_URL, default http://127.0.0.1:8000), which otherwise answers",
    )
    p.add_argument(
        "--keep-alive",
        type=_duration,
        metavar="DURATION",
        help="where no thrifty serve on this machine has the model, start one in the background"
        " (at $THRIFTY_LOCAL_URL) that keeps it loaded until DURATION (90s, 5m, 1h) passes"
        " without a request, and answer through it: later runs and chats skip loading torch"
        " and the model (default: $THRIFTY_KEEP_ALIVE, else 0: load it here)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thrifty", description="Run open-weight LLMs on the hardware you have."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="fetch a model into the cache and prepare it")
    p.add_argument("model", nargs="?", help="registry name, local path or hub id")

    p = sub.add_parser(
        "run",
        help="answer one prompt, streaming (no prompt: a chat)",
        description="Answer PROMPT (- reads it from stdin); with no PROMPT, open a chat. "
        + SAMPLING_HELP,
    )
    p.add_argument("args", nargs="*", metavar="[MODEL] [PROMPT]")
    p.add_argument("--raw", action="store_true", help="complete the text as is, no chat template")
    p.add_argument(
        "--url",
        default=os.environ.get("THRIFTY_URL"),
        help="answer through a running server (thrifty serve, or any OpenAI-compatible one) that"
        " keeps the model loaded, instead of loading it here: no torch import, the first token"
        " after one round trip (default: $THRIFTY_URL)",
    )
    _add_local_server_flags(p)
    _add_model_flags(p)
    _add_sampling_flags(p)
    _add_parallel_flag(p)
    tts_cli.add_run_flags(p)

    p = sub.add_parser(
        "chat",
        help="interactive multi-turn chat",
        description="/help lists the chat's commands. " + SAMPLING_HELP,
    )
    p.add_argument("model", nargs="?", help="registry name, local path or hub id")
    _add_local_server_flags(p)
    _add_model_flags(p)
    _add_sampling_flags(p)
    _add_parallel_flag(p)

    sub.add_parser("models", help="list the models in the cache, by name, with disk size")
    p = sub.add_parser("show", help="a model's architecture, size, quantization and template")
    p.add_argument("model", nargs="?", help="registry name, local path or hub id")
    p = sub.add_parser("rm", help="remove a model (its download and conversions) from the cache")
    p.add_argument("names", nargs="+", metavar="MODEL")
    p = sub.add_parser("ps", help="what a running thrifty server has loaded")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="(default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("THRIFTY_API_KEY"))

    tts_cli.add_eval_parser(sub, _add_model_flags)

    p = sub.add_parser("quantize", help="write an FP8 (E4M3, 128x128 block scales) checkpoint")
    p.add_argument("src", help="registry name, local path or hub id")
    p.add_argument("dst", help="output directory (created; must be empty)")
    p.add_argument(
        "--scale-fmt",
        choices=["ue8m0", "float"],
        default="ue8m0",
        help="ue8m0 (default): power-of-two scales, as DeepSeek-V3.1; float: amax / 448",
    )

    # Unset engine and server flags keep EngineConfig's and ServerConfig's defaults.
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with a web chat page",
        description="Requests that leave sampling fields out get the model's defaults. "
        + SAMPLING_HELP,
    )
    p.add_argument("model", nargs="?", help="registry name, local path or hub id")
    p.add_argument("--served-model-name", help="the model id clients use (default: its name)")
    p.add_argument("--no-access-log", action="store_true", help="no line per request")
    p.add_argument(
        "--keep-alive",
        type=_duration,
        metavar="DURATION",
        help="stop once DURATION (90s, 5m, 1h) passes with no request (default: serve until"
        " stopped)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("THRIFTY_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $THRIFTY_API_KEY)",
    )
    _add_model_flags(p)
    p.add_argument("--max-num-seqs", type=int, help="sequences decoded together (default 64)")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="tokens per forward pass; long prompts are prefilled in chunks of it (default 2048)",
    )
    p.add_argument(
        "--long-prefill-tokens",
        type=int,
        help="a prompt with more tokens to compute than this is prefilled after the short ones"
        " waiting, one at a time, in chunks of this size while others run (default 256)",
    )
    p.add_argument("--kv-cache-memory-bytes", type=int, help="KV cache size (default 1 GiB)")
    p.add_argument("--num-kv-blocks", type=int, help="KV blocks (default: from the memory size)")
    p.add_argument("--block-size", type=int, help="tokens per KV block (default 16)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--num-threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--num-speculative-tokens",
        type=int,
        help="tokens drafted per step by the model's MTP layers (DeepSeek-V3; default 0: off)",
    )
    _add_parallel_flag(p)
    p.add_argument("--max-n", type=int, help="samples per request (default 16)")
    p.add_argument(
        "--max-queued-requests",
        type=int,
        help="requests waiting for a first token before new ones get a 429 (default 256)",
    )
    p.add_argument("--max-body-bytes", type=_positive, help="request body limit (default 4 MiB)")
    p.add_argument(
        "--allowed-origins",
        type=lambda v: tuple(o.strip() for o in v.split(",") if o.strip()),
        help="comma-separated web origins (https://app.example) whose pages may call the API"
        " from a browser (CORS); default none: only this server's own chat page",
    )
    return parser


def _import_torch() -> None:
    """Import torch with the garbage collector off, then take everything the process holds out
    of its view (gc.freeze): modules, classes and functions that live as long as the process.
    Otherwise every full collection during the rest of the start-up, and the one at exit, walks
    torch's ~180k objects again (0.12 s a pass here): `thrifty run --local` spent 0.42 s in
    collections, now 0.03, and ended 0.4-1.3 s sooner. The cyclic garbage of torch's import
    (~7k objects, 0.7 MB) stays frozen."""
    import gc

    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        gc.freeze()
        gc.enable()


def _llm(args: argparse.Namespace, model: str | None, **kwargs: Any):
    """The LLM the model flags (add_model_flags) ask for; `kwargs`: more engine settings."""
    _import_torch()
    from thrifty import kernels
    from thrifty.llm import LLM

    if args.max_model_len is not None:
        kwargs["max_model_len"] = args.max_model_len
    if args.quantization:
        kwargs["quantization"] = args.quantization
    kwargs["kv_cache_dtype"] = args.kv_cache_dtype
    if getattr(args, "num_threads", None):
        kwargs.setdefault("num_threads", args.num_threads)
    if getattr(args, "tensor_parallel_size", None):
        kwargs.setdefault("tensor_parallel_size", args.tensor_parallel_size)
    template = _chat_template(args)  # a missing file is refused before the model loads
    llm = LLM(model, dtype=args.dtype, device=args.device, allow_pickle=args.allow_pickle, **kwargs)
    if template is not None:
        llm.tokenizer.use_chat_template(template)
    if args.device.partition(":")[0] == "cpu":  # a first build takes minutes: say so
        kernels.prepare(lambda line: print(line + " ...", file=sys.stderr, flush=True))
    return llm


def _chat_template(args: argparse.Namespace) -> str | None:
    """--chat-template: a file's text, or the template given inline."""
    from pathlib import Path

    from thrifty.files import read_text

    given = args.chat_template
    if given is None:
        return None
    if "{{" in given or "{%" in given:
        return given
    if not Path(given).expanduser().is_file():
        raise ThriftyError(f"--chat-template: no such file: {given} (or pass the template)")
    return read_text(Path(given).expanduser())


def _params(args: argparse.Namespace, defaults: GenerationDefaults = _DEFAULTS):
    """The sampling flags, the ones not given taken from `defaults`."""
    from thrifty.engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        min_p=args.min_p,
        seed=args.seed,
        **defaults.fill(vars(args)),
    )


def _model_defaults(args: argparse.Namespace, llm: Any) -> GenerationDefaults:
    """The model's defaults, written into `args` for the flags not given (tts reads args)."""
    defaults = GenerationDefaults.from_dir(llm.engine.path)
    for key, value in defaults.fill(vars(args)).items():
        setattr(args, key, value)
    return defaults


def cmd_pull(args: argparse.Namespace) -> None:
    from thrifty import hub

    path = hub.resolve(args.model)
    print(path)


def _model_and_prompt(words: list[str]) -> tuple[str | None, str | None]:
    """`run`'s words: [MODEL] [PROMPT]; one word is a model if it names one, else a prompt.
    A prompt of "-" is read from stdin."""
    from thrifty import hub

    if len(words) > 2:
        raise ThriftyError("usage: thrifty run [MODEL] [PROMPT] (quote the prompt)")
    if len(words) == 1:
        words = [words[0], None] if hub.names_a_model(words[0]) else [None, words[0]]
    model, prompt = (words + [None, None])[:2]
    if prompt == "-":
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise ThriftyError("thrifty run -: stdin held no prompt")
    return model, prompt


def _as_chat(args: argparse.Namespace, prompt: str) -> str | list[dict[str, str]]:
    """The prompt as `run` sends it: raw text with --raw, else one user turn (after --system)."""
    if args.raw:
        return prompt
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return [*messages, {"role": "user", "content": prompt}]


def cmd_run(args: argparse.Namespace) -> None:
    model, prompt = _model_and_prompt(args.args)
    if args.url:
        from thrifty.client import Server

        server = Server(args.url, args.api_key)
        if prompt is None:
            _open_chat(args, model, server)
        else:
            _run_on_server(args, server, model, prompt)
        return
    server = _serving(args, model) if prompt is not None else None  # a chat: _open_chat
    if server is not None:
        _run_on_server(args, server, model, prompt)
        return
    _params(args)  # validate before loading the model
    if prompt is None:
        _open_chat(args, model)
        return
    llm = _llm(args, model)
    params = _params(args, _model_defaults(args, llm))
    prompt = _as_chat(args, prompt)
    if args.strategy or args.max_thinking_tokens is not None:
        tts_cli.run(args, llm, prompt)  # several samples, or a thinking budget
        return
    from thrifty.chat import stream_answer

    stream_answer(llm, prompt, params)


# Flags that shape how this process loads and runs a model: a server has its own.
_LOCAL_ONLY = (
    "dtype",
    "device",
    "kv_cache_dtype",
    "max_model_len",
    "allow_pickle",
    "quantization",
    "chat_template",
    "num_threads",
    "tensor_parallel_size",
    "strategy",
    "max_thinking_tokens",
)


@functools.cache
def _run_defaults() -> argparse.Namespace:
    """`run`'s flags unset (building the parser takes ~6 ms; a run through a server asks twice)."""
    return build_parser().parse_args(["run"])


def _local_flags(args: argparse.Namespace) -> list[str]:
    """The _LOCAL_ONLY flags given, as typed."""
    defaults = _run_defaults()
    return [
        f"--{k.replace('_', '-')}"
        for k in _LOCAL_ONLY
        if getattr(args, k, None) != getattr(defaults, k, None)
    ]


def _serving(args: argparse.Namespace, model: str | None) -> Any:
    """The `thrifty serve` on this machine that has `model` loaded (a client.Server), if `run`
    or `chat` may go through it: no flag that shapes a local load, not --local, and a model
    named as serve names it (a local path loads here); else None."""
    from pathlib import Path

    from thrifty import hub
    from thrifty.client import local_server

    if args.local or _local_flags(args):
        return None
    name = model or hub.DEFAULT_MODEL
    if Path(name).exists():
        return None
    server = local_server(name, args.api_key)
    keep_alive = _keep_alive(args)
    if server is None and keep_alive:
        server = _start_local_server(name, args.api_key, keep_alive)
    return server


def _keep_alive(args: argparse.Namespace) -> float:
    """--keep-alive, else $THRIFTY_KEEP_ALIVE, in seconds (0: off)."""
    if args.keep_alive is not None:
        return args.keep_alive
    try:
        return _duration(os.environ.get("THRIFTY_KEEP_ALIVE") or "0")
    except argparse.ArgumentTypeError as e:
        raise ThriftyError(f"$THRIFTY_KEEP_ALIVE: {e}") from None


def _start_local_server(name: str, api_key: str | None, keep_alive_s: float) -> Any:
    """`--keep-alive`: a `thrifty serve` of `name` started in the background at the local
    address, once it answers (a client.Server); None where it cannot start there (the address
    taken, the model failing to load), said in one line."""
    import subprocess
    import time
    import urllib.parse

    from thrifty import hub
    from thrifty.client import LOCAL_URL, LOCAL_URL_ENV, local_server

    url = urllib.parse.urlsplit(os.environ.get(LOCAL_URL_ENV) or LOCAL_URL)
    log = hub.home() / f"serve-{url.port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "thrifty", "serve", name, "--host", url.hostname or "127.0.0.1",
           "--port", str(url.port or 80), "--keep-alive", str(keep_alive_s)]  # fmt: skip
    env = dict(os.environ, **({"THRIFTY_API_KEY": api_key} if api_key else {}))  # not in argv
    print(f"thrifty: starting a server for {name} at {url.geturl()}, kept for {keep_alive_s:g} s"
          f" after each request (log: {log})", file=sys.stderr, flush=True)  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                start_new_session=True)  # fmt: skip
    while proc.poll() is None:
        server = local_server(name, api_key)
        if server is not None:
            return server
        time.sleep(0.1)
    server = local_server(name, api_key)  # another run's server took the address first
    if server is None:
        lines = log.read_text(errors="replace").strip().splitlines()
        print(f"thrifty: the server did not start ({lines[-1] if lines else 'no output'}):"
              " loading the model here", file=sys.stderr, flush=True)  # fmt: skip
    return server


def _run_on_server(
    args: argparse.Namespace, server: Any, model: str | None, prompt: str | None
) -> None:
    """`run --url`, or `run` with a local server that has the model: the prompt to the server,
    the answer streamed (thrifty/client.py)."""
    _refuse_local_flags(args)
    params = {"max_tokens": args.max_tokens, "min_p": args.min_p}
    for key in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        if getattr(args, key) is not None:  # else the server's model defaults
            params[key] = getattr(args, key)
    try:
        for delta in server.stream(server.model(model), _as_chat(args, prompt), params):
            print(delta, end="", flush=True)
    except KeyboardInterrupt:  # closing the stream aborts the request on the server
        print(" [stopped]", end="")
    print(flush=True)


def _refuse_local_flags(args: argparse.Namespace) -> None:
    given = _local_flags(args)
    if given:
        raise ThriftyError(f"{given[0]} applies where thrifty loads the model, not with --url")


def _server_defaults(server: Any) -> GenerationDefaults:
    """A thrifty server's model defaults (/thrifty/status); thrifty's for any other server."""
    try:
        return GenerationDefaults(**server.status().get("sampling_defaults", {}))
    except (ThriftyError, ValueError, TypeError, OSError):
        return GenerationDefaults()


def _open_chat(args: argparse.Namespace, model: str | None, url_server: Any = None) -> None:
    """A chat: through `url_server` (run --url), through a thrifty serve on this machine that
    has the model loaded, or with the model loaded here. `/model NAME` chooses the same way."""
    from thrifty import hub
    from thrifty.chat import Chat, chat
    from thrifty.client import RemoteModel

    def load(name: str | None) -> tuple[Any, Any]:
        if url_server is not None:
            _refuse_local_flags(args)
            remote = RemoteModel(url_server, url_server.model(name))
            return remote, _params(args, _server_defaults(url_server))
        server = _serving(args, name)  # no torch import, no load here
        if server is not None:
            remote = RemoteModel(server, name or hub.DEFAULT_MODEL)
            return remote, _params(args, _server_defaults(server))
        llm = _llm(args, name)
        return llm, _params(args, GenerationDefaults.from_dir(llm.engine.path))

    llm, params = load(model)
    name = llm.model if isinstance(llm, RemoteModel) else model or hub.DEFAULT_MODEL
    chat(Chat(llm, name, params, args.system, load))


def cmd_chat(args: argparse.Namespace) -> None:
    _params(args)  # validate before loading the model
    _open_chat(args, args.model)


def cmd_models(args: argparse.Namespace) -> None:
    from thrifty import hub

    rows = hub.models_by_name()
    if not rows:
        print(f"no models cached in {hub.home()}; try: thrifty pull {hub.DEFAULT_MODEL}")
        return
    width = max(len(r.name) for r in rows)
    for r in rows:  # name first: it is what run, show and rm take
        paths = ", ".join(str(f.path) for f in r.files)
        print(f"{r.name:<{width}}  {r.kind:<9}  {_size(r.size_bytes):>9}  {paths}")


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000  # type: ignore[assignment]
    raise AssertionError


def cmd_show(args: argparse.Namespace) -> None:
    from thrifty.model_info import describe

    print(describe(args.model))


def cmd_rm(args: argparse.Namespace) -> None:
    from thrifty import hub

    for name in args.names:
        freed = hub.remove(name)
        print(f"removed {name} ({_size(freed)})")


def cmd_ps(args: argparse.Namespace) -> None:
    from thrifty.server.status import fetch_status

    print(fetch_status(args.url, args.api_key))


def cmd_serve(args: argparse.Namespace) -> None:
    from pathlib import Path

    _import_torch()

    from thrifty import hub, kernels
    from thrifty.config import EngineConfig, resolve_dtype, resolve_kv_cache_dtype
    from thrifty.engine import ranks
    from thrifty.engine.llm_engine import LLMEngine
    from thrifty.server.app import check_address, serve
    from thrifty.server.config import ServerConfig

    if not ranks.is_follower():  # torchrun's ranks > 0 serve nothing
        check_address(args.host, args.port)  # before spending seconds on the model

    def given(*names: str) -> dict[str, Any]:
        return {n: getattr(args, n) for n in names if getattr(args, n) is not None}

    path = hub.resolve(args.model)
    config = EngineConfig(
        dtype=(dtype := resolve_dtype(args.dtype, path, args.device)),
        device=args.device,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        quantization=args.quantization,
        kv_cache_dtype=resolve_kv_cache_dtype(args.kv_cache_dtype, args.dtype, dtype),
        **given(
            "max_num_seqs",
            "max_num_batched_tokens",
            "long_prefill_tokens",
            "kv_cache_memory_bytes",
            "num_kv_blocks",
            "block_size",
            "num_threads",
            "num_speculative_tokens",
            "tensor_parallel_size",
        ),
    )
    name = args.model or hub.DEFAULT_MODEL
    template = _chat_template(args)
    served = ServerConfig(
        model_name=args.served_model_name or (Path(name).name if Path(name).exists() else name),
        api_key=args.api_key or None,
        access_log=not args.no_access_log,
        keep_alive_s=args.keep_alive or None,
        **given("max_n", "max_queued_requests", "max_body_bytes", "allowed_origins"),
    )
    if ranks.is_follower():  # under torchrun: rank 0 serves, this rank runs its steps
        ranks.follow(path, config, args.allow_pickle)
        return

    def load() -> LLMEngine:
        if config.device.partition(":")[0] == "cpu":  # built now, not by the first request
            built = kernels.prepare(lambda line: print(line, file=sys.stderr, flush=True))
            print(built, flush=True)  # what each kernel runs on: information, beside "serving"
        engine = LLMEngine(path, config, allow_pickle=args.allow_pickle)
        if template is not None:
            engine.tokenizer.use_chat_template(template)
        return engine

    serve(load, served, args.host, args.port)


def cmd_quantize(args: argparse.Namespace) -> None:
    from thrifty import hub
    from thrifty.quant.checkpoint import quantize_checkpoint

    print(quantize_checkpoint(hub.resolve(args.src), args.dst, args.scale_fmt))


COMMANDS = {
    "pull": cmd_pull,
    "run": cmd_run,
    "chat": cmd_chat,
    "models": cmd_models,
    "show": cmd_show,
    "rm": cmd_rm,
    "ps": cmd_ps,
    "eval": tts_cli.cmd_eval,
    "serve": cmd_serve,
    "quantize": cmd_quantize,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except ThriftyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """The `thrifty` command: main(), then, once torch is loaded, an exit without the
    interpreter's teardown, whose torch destructors keep the shell waiting 0.26 s after the
    answer here (as long as a bare `import torch` process takes to end). Exit handlers still run
    (they close a tensor-parallel run's ranks and flush logging), then the output is flushed."""
    code = main()
    if "torch" not in sys.modules:
        sys.exit(code)
    import atexit
    import contextlib

    atexit._run_exitfuncs()  # what a normal exit runs before the teardown skipped here
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`| head`) or stream
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
