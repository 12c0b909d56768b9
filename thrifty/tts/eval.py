"""`thrifty eval`: a sweep of strategies over a task, accuracy against compute, JSON and plots.

The sweep is "nested" by default: self-consistency runs once, at the largest N, recording each
token's confidence, and self-consistency@k, adaptive consistency and DeepConf (up to that N) are
replayed on its samples (thrifty.tts.replay: the samples are independent, so the first k are a
valid draw of k, taken in the order the strategy would ask for them). Derived rows have tokens
but no wall time of their own (`wall_s` is None). `nested=False` runs every strategy online.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from thrifty.errors import ThriftyError
from thrifty.tts import replay
from thrifty.tts.config import TTSConfig
from thrifty.tts.equivalence import equivalent
from thrifty.tts.runner import run_jobs
from thrifty.tts.strategies import Job
from thrifty.tts.tasks import INSTRUCTION, Problem


def label(cfg: TTSConfig) -> str:
    """greedy, self-consistency@8, adaptive@16, adaptive@16 c=0.9, deepconf@16 keep=0.5: the
    confidence and keep appear where they differ from the defaults."""
    if cfg.strategy == "greedy":
        return "greedy"
    name = f"{cfg.strategy}@{cfg.n}"
    if cfg.strategy == "adaptive" and cfg.confidence != TTSConfig.confidence:
        name += f" c={cfg.confidence:g}"
    if cfg.strategy == "deepconf" and cfg.keep != TTSConfig.keep:
        name += f" keep={cfg.keep:g}"
    return name


def sweep_configs(
    strategies: list[str],
    ns: list[int],
    base: TTSConfig,
    confidences: list[float] | None = None,
    keeps: list[float] | None = None,
) -> list[TTSConfig]:
    """One config per (strategy, N); adaptive and deepconf get the largest N as their cap, and
    one config per adaptive `confidences` and DeepConf `keeps` (default: base's)."""
    top = max(ns)
    configs = []
    for s in strategies:
        if s == "greedy":
            configs.append(dataclasses.replace(base, strategy=s, n=1))
        elif s == "adaptive":
            configs.extend(
                dataclasses.replace(base, strategy=s, n=top, confidence=c)
                for c in confidences or [base.confidence]
            )
        elif s == "deepconf":
            warmup = min(base.warmup, top - 1) if top > 1 else 1
            configs.extend(
                dataclasses.replace(base, strategy=s, n=top, warmup=warmup, keep=k)
                for k in keeps or [base.keep]
            )
        else:
            configs.extend(dataclasses.replace(base, strategy=s, n=k) for k in sorted(set(ns)))
    return configs


def _row(cfg: TTSConfig, problems: list[Problem], results: list[dict], wall_s: float | None):
    correct = [equivalent(r["answer"], p.answer) for r, p in zip(results, problems, strict=True)]
    n = len(problems)
    # Online runs list their samples: how many gave no answer, and how many max_tokens cut off
    # (a cap too tight for the model's working shows here first).
    samples = [s for r in results for s in r.get("samples", ())]
    share = lambda hit: sum(map(hit, samples)) / len(samples) if samples else None  # noqa: E731
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
        "unanswered": share(lambda s: s["answer"] is None),
        "cut_off": share(lambda s: s["finish_reason"] == "length"),
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


def problem_config(cfg: TTSConfig, index: int) -> TTSConfig:
    """`cfg` with problem `index`'s own sampling seed. Sample k of a seeded job draws from the
    stream of (seed, k); with one seed for every problem, sample k of every problem would draw the
    same uniforms, and prompts this alike then start alike: in one run of 200 problems, from 3
    to 30 samples per position gave no answer, and a single sample's accuracy read 25.5% at
    position 0 against 35% over all 16. Every figure of a sweep then rests on 16 draws shared
    by all problems, not on independent ones."""
    if cfg.seed is None:
        return cfg
    digest = hashlib.blake2b(f"{cfg.seed}:{index}".encode(), digest_size=5).digest()
    return dataclasses.replace(cfg, seed=int.from_bytes(digest, "little"))  # < 2**40


def _samples(job: Job) -> list[replay.Sample]:
    """A finished self-consistency job's samples, in the order they were drawn."""
    return [
        replay.Sample(t.answer, len(t.token_ids), tuple(t.token_confidences or ()))
        for t in job.traces + job.stopped
    ]


def _derivable(cfg: TTSConfig, largest: TTSConfig) -> bool:
    """Whether `cfg` can be replayed on the samples of the `largest` self-consistency run."""
    if cfg is largest or cfg.n > largest.n or cfg.strategy == "greedy":
        return False
    if cfg.strategy == "deepconf":
        return cfg.top_logprobs == largest.top_logprobs
    return cfg.strategy in ("self-consistency", *replay.REPLAYABLE)


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
    save_confidences: bool = False,
) -> list[dict[str, Any]]:
    """Run every config over every problem; one row of figures per config, in config order.
    `on_rows` gets the rows so far after each run (to save partial results).
    `save_confidences` keeps each drawn sample's token confidences in its row, so that DeepConf
    settings can be replayed later without the model."""
    tok = engine.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template(p.messages(instruction)), add_special_tokens=False)
        for p in problems
    ]
    sc = [c for c in configs if c.strategy == "self-consistency"]
    largest = max(sc, key=lambda c: c.n) if nested and sc else None
    derived = [c for c in configs if largest is not None and _derivable(c, largest)]
    # The online runs: the largest self-consistency first (the others are read off it).
    runs = [c for c in configs if c not in derived]
    if largest is not None:
        runs.remove(largest)
        runs.insert(0, largest)
    record = next((c.top_logprobs for c in derived if c.strategy == "deepconf"), None)
    rows: dict[str, dict] = {}

    def report() -> None:
        if on_rows is not None:
            on_rows([rows[label(c)] for c in configs if label(c) in rows])

    for cfg in runs:
        jobs = [Job(engine, ids, problem_config(cfg, i)) for i, ids in enumerate(prompts)]
        if cfg is largest:
            for job in jobs:
                job.record_logprobs = record
        with tqdm(total=len(jobs), desc=f"{label(cfg):>22}", disable=not progress) as bar:
            start = time.perf_counter()
            # samples in flight per job: a wave for adaptive, the warm-up for DeepConf
            # (then waves), all n for the others
            width = {"adaptive": cfg.wave, "deepconf": max(cfg.warmup, cfg.wave)}.get(
                cfg.strategy, cfg.n
            )
            run_jobs(engine, jobs, max(1, max_num_seqs // width), lambda _: bar.update())
            wall = time.perf_counter() - start
        rows[label(cfg)] = _row(cfg, problems, [j.result() for j in jobs], wall)
        if cfg is largest:
            samples = [_samples(j) for j in jobs]
            # Every sample's answer and length (and, if asked, each token's confidence), in
            # draw order, for studying other rules offline (benchmarks/tts_stopping.py).
            for entry, drawn in zip(rows[label(cfg)]["per_problem"], samples, strict=True):
                entry["drawn"] = [[s.answer, s.tokens] for s in drawn]
                if save_confidences and record is not None:
                    entry[CONFIDENCES] = [[round(c, 4) for c in s.token_confidences] for s in drawn]
            for small in derived:
                results = [replay.replay(s, small) for s in samples]
                rows[label(small)] = {
                    **_row(small, problems, results, None),
                    "derived_from": label(cfg),
                }
        report()
    return [rows[label(c)] for c in configs]


def write_results(rows: list[dict], meta: dict[str, Any], out: Path) -> list[Path]:
    """`out`.json with every row (and per-problem answers), and three PNG plots beside it; drawn
    samples' token confidences, where kept, go to `out`_samples.json.gz (compact, compressed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "machine": platform.machine(), "python": platform.python_version()}
    rows, confidences = _split_confidences(rows)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    paths = [json_path]
    if confidences:
        paths.append(out.with_name(out.name + SAMPLES_SUFFIX))
        paths[-1].write_bytes(gzip.compress(json.dumps(confidences).encode(), mtime=0))
    md_path = out.with_suffix(".md")
    header = [meta.get("title", ""), ""]
    if "command" in meta:
        header += [f"    {meta['command']}", ""]
    md_path.write_text("\n".join([*header, format_table(rows)]) + "\n")
    return [*paths, md_path, *plot(rows, out, title=meta.get("title", ""))]


SAMPLES_SUFFIX = "_samples.json.gz"
CONFIDENCES = "drawn_confidences"  # per problem, beside "drawn": each sample's token confidences


def _split_confidences(rows: list[dict]) -> tuple[list[dict], dict[str, list]]:
    """The rows without their kept token confidences, and {row label: per problem, per sample,
    the token confidences} for the rows that kept them."""
    kept: dict[str, list] = {}
    out = []
    for row in rows:
        if not row["per_problem"] or CONFIDENCES not in row["per_problem"][0]:
            out.append(row)
            continue
        kept[row["label"]] = [p[CONFIDENCES] for p in row["per_problem"]]
        problems = [{k: v for k, v in p.items() if k != CONFIDENCES} for p in row["per_problem"]]
        out.append({**row, "per_problem": problems})
    return out, kept


def read_samples(path: Path) -> tuple[list[str], list[list[replay.Sample]], int]:
    """From a `thrifty eval` JSON: the gold answers, each problem's drawn samples (with their
    token confidences where the sweep kept them) and the N they were drawn for."""
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ThriftyError(f"{path}: not a `thrifty eval` JSON ({e})") from None
    row = next((r for r in rows if r["per_problem"] and "drawn" in r["per_problem"][0]), None)
    if row is None:
        raise ThriftyError(f"{path}: no row with drawn samples (rerun `thrifty eval`)")
    side = Path(path).with_name(Path(path).with_suffix("").name + SAMPLES_SUFFIX)
    confidences = (
        json.loads(gzip.decompress(side.read_bytes()))[row["label"]] if side.is_file() else None
    )
    samples = []
    for i, p in enumerate(row["per_problem"]):
        confs = confidences[i] if confidences else [()] * len(p["drawn"])
        samples.append(
            [replay.Sample(a, t, tuple(c)) for (a, t), c in zip(p["drawn"], confs, strict=True)]
        )
    return [p["gold"] for p in row["per_problem"]], samples, row["n"]


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


def cut_off_warning(rows: list[dict], max_tokens: int, limit: float = 0.1) -> str | None:
    """A line for the user when max_tokens cut off more than `limit` of some run's samples."""
    worst = max(
        (r for r in rows if r.get("cut_off") is not None), key=lambda r: r["cut_off"], default=None
    )
    if worst is None or worst["cut_off"] <= limit:
        return None
    return (
        f"warning: max_tokens {max_tokens} cut off {100 * worst['cut_off']:.0f}% of the samples"
        f" of {worst['label']}; their answers are lost (raise --max-tokens)"
    )


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
