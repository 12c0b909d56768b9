"""Command line: `thrifty pull | run | chat | models | serve | quantize | eval`.

Flags map one to one onto config fields.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from thrifty.errors import ThriftyError
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


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float32 or float16")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, ...")
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


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--system", help="system message for the chat template")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thrifty", description="Run open-weight LLMs on the hardware you have."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="fetch a model into the cache and prepare it")
    p.add_argument("model", nargs="?", help="registry name, local path or hub id")

    p = sub.add_parser("run", help="answer one prompt, streaming")
    p.add_argument("args", nargs="+", metavar="[MODEL] PROMPT")
    p.add_argument("--raw", action="store_true", help="complete the text as is, no chat template")
    _add_model_flags(p)
    _add_sampling_flags(p)
    tts_cli.add_run_flags(p)

    p = sub.add_parser("chat", help="interactive multi-turn chat")
    p.add_argument("model", nargs="?", help="registry name, local path or hub id")
    _add_model_flags(p)
    _add_sampling_flags(p)

    sub.add_parser("models", help="list the models in the cache")

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
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page")
    p.add_argument("model", nargs="?", help="registry name, local path or hub id")
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
    p.add_argument(
        "--tensor-parallel-size",
        type=_positive,
        help="ranks that split the model (tensor parallel; MoE experts: expert parallel); more"
        " than 1 spawns the others on this machine, or joins torchrun's (default 1)",
    )
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


def _llm(args: argparse.Namespace, model: str | None, **kwargs: Any):
    """The LLM the model flags (add_model_flags) ask for; `kwargs`: more engine settings."""
    from thrifty.llm import LLM

    if args.max_model_len is not None:
        kwargs["max_model_len"] = args.max_model_len
    if args.quantization:
        kwargs["quantization"] = args.quantization
    return LLM(
        model, dtype=args.dtype, device=args.device, allow_pickle=args.allow_pickle, **kwargs
    )


def _params(args: argparse.Namespace):
    from thrifty.engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def _stream(llm, prompt, params) -> str:
    """Print the answer as it comes; Ctrl-C stops this answer only. Returns the text."""
    parts = []
    stream = llm.stream(prompt, params)
    try:
        for delta in stream:
            parts.append(delta)
            print(delta, end="", flush=True)
    except KeyboardInterrupt:
        stream.close()  # aborts the request and frees its blocks
        print(" [stopped]", end="")
    print(flush=True)
    return "".join(parts)


def cmd_pull(args: argparse.Namespace) -> None:
    from thrifty import hub

    path = hub.resolve(args.model)
    print(path)


def cmd_run(args: argparse.Namespace) -> None:
    if len(args.args) > 2:
        raise ThriftyError("usage: thrifty run [MODEL] PROMPT (quote the prompt)")
    model, prompt = (None, args.args[0]) if len(args.args) == 1 else args.args
    params = _params(args)  # validate before loading the model
    llm = _llm(args, model)
    if not args.raw:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = [*messages, {"role": "user", "content": prompt}]
    if args.strategy or args.max_thinking_tokens is not None:
        tts_cli.run(args, llm, prompt)  # several samples, or a thinking budget
        return
    _stream(llm, prompt, params)


def cmd_chat(args: argparse.Namespace) -> None:
    params = _params(args)
    llm = _llm(args, args.model)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    print(
        "thrifty chat: /reset clears the conversation, /exit or Ctrl-D leaves, "
        "Ctrl-C stops an answer.",
        file=sys.stderr,
    )
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        try:
            answer = _stream(llm, history, params)
        except ThriftyError as e:  # e.g. the conversation outgrew the context
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": answer})


def cmd_models(args: argparse.Namespace) -> None:
    from thrifty import hub

    rows = hub.cached_models()
    if not rows:
        print(f"no models cached in {hub.home()}; try: thrifty pull {hub.DEFAULT_MODEL}")
        return
    width = max(len(r.name) for r in rows)
    for r in rows:
        print(f"{r.name:<{width}}  {r.kind:<9}  {r.size_bytes / 2**20:9.1f} MiB  {r.path}")


def cmd_serve(args: argparse.Namespace) -> None:
    from pathlib import Path

    from thrifty import hub, kernels
    from thrifty.config import EngineConfig, parse_dtype
    from thrifty.engine import ranks
    from thrifty.engine.llm_engine import LLMEngine
    from thrifty.server.app import check_address, serve
    from thrifty.server.config import ServerConfig

    if not ranks.is_follower():  # torchrun's ranks > 0 serve nothing
        check_address(args.host, args.port)  # before spending seconds on the model

    def given(*names: str) -> dict[str, Any]:
        return {n: getattr(args, n) for n in names if getattr(args, n) is not None}

    config = EngineConfig(
        dtype=parse_dtype(args.dtype),
        device=args.device,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        quantization=args.quantization,
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
    served = ServerConfig(
        model_name=Path(name).name if Path(name).exists() else name,
        api_key=args.api_key or None,
        **given("max_n", "max_queued_requests", "max_body_bytes", "allowed_origins"),
    )
    path = hub.resolve(args.model)
    if ranks.is_follower():  # under torchrun: rank 0 serves, this rank runs its steps
        ranks.follow(path, config, args.allow_pickle)
        return

    def load() -> LLMEngine:
        if config.device.partition(":")[0] == "cpu":  # built now, not by the first request
            built = kernels.prepare(lambda line: print(line, file=sys.stderr, flush=True))
            print(built, flush=True)  # what each kernel runs on: information, beside "serving"
        return LLMEngine(path, config, allow_pickle=args.allow_pickle)

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


if __name__ == "__main__":
    sys.exit(main())
