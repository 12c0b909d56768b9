"""The command-line side of test-time scaling: `thrifty run --strategy ...` and `thrifty eval`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thrifty.errors import ThriftyError
from thrifty.tts.config import DEEPCONF_STOPS, STRATEGIES, TTSConfig
from thrifty.tts.tasks import TASKS
from thrifty.tts.voting import STOPPING_RULES

SAMPLING_TEMPERATURE = TTSConfig.temperature  # what --temperature 0 means for sampling strategies


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        help="test-time scaling: sample several answers and pick one (sampling strategies use "
        f"--temperature, or {SAMPLING_TEMPERATURE} when it is 0)",
    )
    p.add_argument("--n", type=int, default=8, help="samples for --strategy (default 8)")
    p.add_argument(
        "--max-thinking-tokens",
        type=int,
        help="for <think> models: close the reasoning after this many tokens and force an answer",
    )


def add_eval_parser(sub: Any, add_model_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("eval", help="accuracy against compute for test-time scaling strategies")
    p.add_argument("model", nargs="?", help="registry name, local path or hub id")
    p.add_argument("--task", choices=TASKS, default="basic_arithmetic")
    p.add_argument("--data", help="a JSONL file of {question, answer} instead of a task")
    p.add_argument("--size", type=int, default=50, help="problems (default 50)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="task and sampling seed (default 0); reasoning-gym builds problem i from seed + i,"
        " so seeds less than --size apart share problems",
    )
    p.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="reasoning-gym option, e.g. max_terms=4 (basic_arithmetic defaults: 3-4 terms of "
        "1-2 digits)",
    )
    p.add_argument(
        "--strategies",
        default="greedy,self-consistency,adaptive,deepconf",
        help=f"comma-separated, from {', '.join(STRATEGIES)}",
    )
    p.add_argument("--ns", default="1,2,4,8", help="sample counts to sweep (default 1,2,4,8)")
    p.add_argument(
        "--confidences",
        default=str(TTSConfig.confidence),
        help="adaptive consistency's stopping confidences to sweep (default 0.95)",
    )
    p.add_argument(
        "--keeps", default=str(TTSConfig.keep), help="DeepConf keep shares to sweep (default 0.9)"
    )
    p.add_argument(
        "--stopping-rule",
        choices=STOPPING_RULES,
        default=TTSConfig.stopping_rule,
        help=f"adaptive consistency's rule, also DeepConf's with --deepconf-stop adaptive"
        f" (default {TTSConfig.stopping_rule})",
    )
    p.add_argument(
        "--deepconf-stop",
        choices=DEEPCONF_STOPS,
        default=TTSConfig.deepconf_stop,
        help="when DeepConf draws no more traces: the paper's consensus share, or adaptive"
        f" consistency's rule at 0.95 (default {TTSConfig.deepconf_stop})",
    )
    p.add_argument(
        "--numeric",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="only numeric answers vote, others count as none (default: on when every gold"
        " answer is a number)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=TTSConfig.max_tokens,
        help=f"per sample (default {TTSConfig.max_tokens}); a sample cut off gives no answer",
    )
    p.add_argument("--temperature", type=float, default=SAMPLING_TEMPERATURE)
    p.add_argument("--top-p", type=float, default=TTSConfig.top_p)
    p.add_argument(
        "--nested",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run self-consistency once at the largest N and replay self-consistency@k, adaptive"
        " and deepconf on its samples (default); --no-nested runs each online",
    )
    p.add_argument(
        "--save-confidences",
        action="store_true",
        help="with --nested and deepconf: keep every drawn sample's token confidences in"
        " PREFIX_samples.json.gz, to replay other DeepConf settings offline"
        " (benchmarks/tts_stopping.py)",
    )
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together")
    p.add_argument("--num-threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--out", default="tts_eval", help="output path prefix: PREFIX.json and PREFIX_*.png"
    )
    add_model_flags(p)


def run(args: argparse.Namespace, llm: Any, prompt: str | list[dict[str, str]]) -> None:
    """`thrifty run --strategy ...`: print the chosen answer, then the votes and the cost."""
    from thrifty.tts.runner import run_strategy

    strategy = args.strategy or "greedy"
    temperature = args.temperature or SAMPLING_TEMPERATURE
    config = TTSConfig(
        strategy=strategy,
        n=args.n,
        temperature=temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
        warmup=min(TTSConfig.warmup, max(args.n - 1, 1)),
        max_thinking_tokens=args.max_thinking_tokens,
    )
    ids = llm._chat_ids(prompt) if isinstance(prompt, list) else prompt
    with Progress(llm.engine, config.n if strategy != "greedy" else 1) as engine:
        result = run_strategy(engine, ids, config)
    print(result["text"].strip())
    votes = ", ".join(f"{a}: {w:g}" for a, w in result["votes"].items()) or "none"
    print(
        f"\n[{strategy}] answer: {result['answer']}  votes: {votes}  samples: "
        f"{result['num_samples']} (stopped early: {result['num_stopped_early']})  tokens: "
        f"{result['tokens']}  {result['wall_s']:.1f} s",
        file=sys.stderr,
    )


class Progress:
    """The engine, with a progress bar on stderr: samples finished and tokens generated (a
    self-consistency run of 8 samples is minutes of silence on a small CPU otherwise)."""

    def __init__(self, engine: Any, num_samples: int):
        from tqdm import tqdm

        self._engine, self.samples, self.tokens = engine, 0, 0
        self._bar = tqdm(total=num_samples, desc="samples", unit="sample", file=sys.stderr,
                         leave=False, disable=None)  # fmt: skip  # None: off when not a tty

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def step(self) -> Any:
        outputs = self._engine.step()
        done = sum(o.finish_reason is not None for o in outputs)
        self.samples += done
        self.tokens += sum(len(o.token_ids) for o in outputs)
        self._bar.set_postfix_str(f"{self.tokens} tokens", refresh=False)
        self._bar.update(done)
        return outputs

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()


def _numbers(flag: str, text: str, kind: type) -> list:
    """Parse "1,2,4" into [1, 2, 4], sorted and without repeats; a clear error otherwise."""
    try:
        return sorted({kind(x) for x in text.split(",")})
    except ValueError:
        raise ThriftyError(f"{flag} must be comma-separated numbers, not {text!r}") from None


def cmd_eval(args: argparse.Namespace) -> None:
    from thrifty.cli import _llm
    from thrifty.tts.eval import (
        cut_off_warning,
        evaluate,
        format_table,
        sweep_configs,
        write_results,
    )
    from thrifty.tts.tasks import all_numeric, load_problems, parse_options

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise ThriftyError(f"unknown strategy {bad}; choose from {', '.join(STRATEGIES)}")
    ns = _numbers("--ns", args.ns, int)
    confidences = _numbers("--confidences", args.confidences, float)
    keeps = _numbers("--keeps", args.keeps, float)
    options = parse_options(args.task_option)
    problems = load_problems(args.task, args.size, args.seed, options, args.data)
    numeric = all_numeric(problems) if args.numeric is None else args.numeric
    base = TTSConfig(
        n=max(ns),
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stopping_rule=args.stopping_rule,
        deepconf_stop=args.deepconf_stop,
        numeric=numeric,
    )
    # validates every config before loading the model
    configs = sweep_configs(strategies, ns, base, confidences, keeps)
    engine_kwargs: dict[str, Any] = {"max_num_seqs": args.max_num_seqs}
    if args.num_threads:
        engine_kwargs["num_threads"] = args.num_threads
    llm = _llm(args, args.model, **engine_kwargs)
    name = Path(args.data).name if args.data else args.task
    meta = {
        "model": args.model or "default",
        "task": name,
        "task_options": options,
        "problems": len(problems),
        "seed": args.seed,
        "config": {
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_tokens": args.max_tokens,
            "ns": ns,
            "confidences": confidences,
            "keeps": keeps,
            "stopping_rule": args.stopping_rule,
            "deepconf_stop": args.deepconf_stop,
            "numeric": numeric,
            "nested": args.nested,
        },
        "command": "thrifty " + " ".join(sys.argv[1:]),
        "title": f"{args.model or 'default'} on {len(problems)} {name} problems",
    }
    start = time.perf_counter()

    def save(rows: list[dict]) -> list[Path]:
        meta["total_wall_s"] = time.perf_counter() - start
        meta["load_average"] = os.getloadavg()  # timings on a busy machine are noisy
        return write_results(rows, meta, Path(args.out))

    out = Path(args.out).resolve()
    print(f"thrifty eval: writing {out}.json, {out}.md and {out}_*.png as rows finish",
          file=sys.stderr, flush=True)  # fmt: skip
    rows = evaluate(
        llm.engine,
        problems,
        configs,
        max_num_seqs=args.max_num_seqs,
        nested=args.nested,
        on_rows=save,  # partial results survive an interrupted sweep
        save_confidences=args.save_confidences,
    )
    paths = save(rows)
    print(format_table(rows))
    if warning := cut_off_warning(rows, args.max_tokens):
        print(warning, file=sys.stderr)
    print("\n".join(str(p) for p in paths), file=sys.stderr)
