"""Command line: `thrifty pull | run | chat | models`. Flags map one to one onto config fields."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from thrifty.errors import ThriftyError


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float32 or float16")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, ...")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow loading pickled .bin/.pt weights (unpickling can run code)",
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

    p = sub.add_parser("chat", help="interactive multi-turn chat")
    p.add_argument("model", nargs="?", help="registry name, local path or hub id")
    _add_model_flags(p)
    _add_sampling_flags(p)

    sub.add_parser("models", help="list the models in the cache")
    return parser


def _llm(args: argparse.Namespace, model: str | None):
    from thrifty.llm import LLM

    kwargs: dict[str, Any] = {}
    if args.max_model_len:
        kwargs["max_model_len"] = args.max_model_len
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


COMMANDS = {"pull": cmd_pull, "run": cmd_run, "chat": cmd_chat, "models": cmd_models}


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
