"""`thrifty eval`: a sweep of strategies over a task, accuracy against compute, JSON and plots.

Self-consistency at several N is "nested" by default: one run at the largest N, and SC@k read
off the first k samples of each problem (the samples are independent, so the first k are a
valid draw of k). Those rows have tokens but no wall time of their own (`wall_s` is None).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from thrifty.tts.config import TTSConfig
from thrifty.tts.equivalence import equivalent
from thrifty.tts.runner import run_jobs
from thrifty.tts.strategies import Job
from thrifty.tts.tasks import INSTRUCTION, Problem
from thrifty.tts.voting import tally


def label(cfg: TTSConfig) -> str:
    return "greedy" if cfg.strategy == "greedy" else f"{cfg.strategy}@{cfg.n}"


def sweep_configs(strategies: list[str], ns: list[int], base: TTSConfig) -> list[TTSConfig]:
    """One config per (strategy, N); adaptive and deepconf get the largest N as their cap."""
    top = max(ns)
    configs = []
    for s in strategies:
        if s == "greedy":
            configs.append(dataclasses.replace(base, strategy=s, n=1))
        elif s in ("adaptive", "deepconf"):
            warmup = min(base.warmup, top - 1) if top > 1 else 1
            configs.append(dataclasses.replace(base, strategy=s, n=top, warmup=warmup))
        else:
            configs.extend(dataclasses.replace(base, strategy=s, n=k) for k in sorted(set(ns)))
    return configs


def _row(cfg: TTSConfig, problems: list[Problem], results: list[dict], wall_s: float | None):
    correct = [equivalent(r["answer"], p.answer) for r, p in zip(results, problems, strict=True)]
    n = len(problems)
    return {
        "label": label(cfg),
        "strategy": cfg.strategy,
        "n": cfg.n,
        "accuracy": sum(correct) / n,
        "correct": sum(correct),
        "problems": n,
        "tokens": sum(r["tokens"] for r in results),
        "tokens_per_problem": sum(r["tokens"] for r in results) / n,
        "samples_per_problem": sum(r["num_samples"] for r in results) / n,
        "stopped_early": sum(r["num_stopped_early"] for r in results),
        "wall_s": wall_s,
        "per_problem": [
            {
                "gold": p.answer,
                "answer": r["answer"],
                "correct": c,
                "tokens": r["tokens"],
                "samples": r["num_samples"],
            }
            for p, r, c in zip(problems, results, correct, strict=True)
        ],
    }


def _prefix_result(result: dict, k: int, symbolic: bool) -> dict:
    """Self-consistency over the first k samples of a larger run."""
    samples = result["samples"][:k]
    votes = tally([s["answer"] for s in samples], symbolic=symbolic)
    return {
        "answer": votes[0].answer if votes else None,
        "tokens": sum(s["tokens"] for s in samples),
        "num_samples": k,
        "num_stopped_early": 0,
    }


def evaluate(
    engine: Any,
    problems: list[Problem],
    configs: list[TTSConfig],
    *,
    max_num_seqs: int = 64,
    nested: bool = True,
    progress: bool = True,
    instruction: str = INSTRUCTION,
    on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every config over every problem; one row of figures per config, in config order.
    `on_rows` gets the rows so far after each run (to save partial results)."""
    tok = engine.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template(p.messages(instruction)), add_special_tokens=False)
        for p in problems
    ]
    sc = [c for c in configs if c.strategy == "self-consistency"]
    runs = list(configs)
    if nested and sc:  # the largest self-consistency run stands in for all of them
        largest = max(sc, key=lambda c: c.n)
        runs = [
            largest if c is sc[0] else c
            for c in configs
            if c.strategy != "self-consistency" or c is sc[0]
        ]
    rows: dict[str, dict] = {}
    for cfg in runs:
        jobs = [Job(engine, ids, cfg) for ids in prompts]
        with tqdm(total=len(jobs), desc=f"{label(cfg):>22}", disable=not progress) as bar:
            start = time.perf_counter()
            # samples in flight per job: a wave for adaptive, all n for the others
            width = cfg.wave if cfg.strategy == "adaptive" else cfg.n
            run_jobs(engine, jobs, max(1, max_num_seqs // width), lambda _: bar.update())
            wall = time.perf_counter() - start
        results = [j.result() for j in jobs]
        rows[label(cfg)] = _row(cfg, problems, results, wall)
        if nested and cfg.strategy == "self-consistency":
            for small in sc:
                if small.n < cfg.n:
                    derived = [_prefix_result(r, small.n, cfg.symbolic) for r in results]
                    row = _row(small, problems, derived, None)
                    rows[label(small)] = {**row, "derived_from": label(cfg)}
        if on_rows is not None:
            on_rows([rows[label(c)] for c in configs if label(c) in rows])
    return [rows[label(c)] for c in configs]


def write_results(rows: list[dict], meta: dict[str, Any], out: Path) -> list[Path]:
    """`out`.json with every row (and per-problem answers), and three PNG plots beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "machine": platform.machine(), "python": platform.python_version()}
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md_path = out.with_suffix(".md")
    header = [meta.get("title", ""), ""]
    if "command" in meta:
        header += [f"    {meta['command']}", ""]
    md_path.write_text("\n".join([*header, format_table(rows)]) + "\n")
    return [json_path, md_path, *plot(rows, out, title=meta.get("title", ""))]


def plot(rows: list[dict], out: Path, title: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    by_strategy: dict[str, list[dict]] = {}
    for r in rows:
        by_strategy.setdefault(r["strategy"], []).append(r)

    def draw(x_key: str, xlabel: str, suffix: str, log: bool) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for strategy, rs in by_strategy.items():
            rs = sorted(rs, key=lambda r: r[x_key])
            xs, ys = [r[x_key] for r in rs], [100 * r["accuracy"] for r in rs]
            style = "o-" if len(rs) > 1 else ("s" if strategy != "greedy" else "k*")
            ax.plot(xs, ys, style, label=strategy, markersize=8)
        if log:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, min(100, 10 + max(100 * r["accuracy"] for r in rows)))
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out.parent / f"{out.name}_{suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    draw(
        "samples_per_problem", "samples per problem (N; adaptive: mean used)", "accuracy_vs_n", True
    )
    draw("tokens_per_problem", "generated tokens per problem", "accuracy_vs_tokens", True)

    timed = [r for r in rows if r["wall_s"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.barh([r["label"] for r in timed], [r["wall_s"] for r in timed])
    ax.set_xlabel("wall time for the whole task (s)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = out.parent / f"{out.name}_wall_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def format_table(rows: list[dict]) -> str:
    lines = [
        "| strategy | accuracy | samples / problem | tokens / problem | wall s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else f"(from {r['derived_from']})"
        lines.append(
            f"| {r['label']} | {100 * r['accuracy']:.1f}% ({r['correct']}/{r['problems']}) | "
            f"{r['samples_per_problem']:.2f} | {r['tokens_per_problem']:.0f} | {wall} |"
        )
    return "\n".join(lines)
