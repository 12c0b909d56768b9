"""Adaptive-consistency stopping rules replayed on a recorded `thrifty eval` sweep.

`thrifty eval` keeps every sample its largest self-consistency run drew (answer and length, in
draw order: `per_problem[i]["drawn"]`). Samples of one prompt are independent, so any stopping
rule can be replayed on them offline, exactly as the online job would decide
(thrifty.tts.replay.adaptive). This sweeps the rule (Beta, Dirichlet), the confidence and the
wave size, and prints accuracy and samples per problem against self-consistency at the same
budget. No model runs; a sweep takes seconds.

    python benchmarks/tts_stopping.py benchmarks/results/tts_basic_arithmetic_qwen05b_200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from thrifty.tts.config import TTSConfig
from thrifty.tts.equivalence import equivalent
from thrifty.tts.replay import Sample, replay


def load(path: Path) -> tuple[list[str], list[list[Sample]], int]:
    """Gold answers and each problem's drawn samples, from the row that recorded them."""
    rows = json.loads(path.read_text())["rows"]
    row = next((r for r in rows if r["per_problem"] and "drawn" in r["per_problem"][0]), None)
    if row is None:
        raise SystemExit(f"{path}: no row with drawn samples (rerun `thrifty eval`)")
    gold = [p["gold"] for p in row["per_problem"]]
    samples = [[Sample(a, t) for a, t in p["drawn"]] for p in row["per_problem"]]
    return gold, samples, row["n"]


def score(gold: list[str], samples: list[list[Sample]], config: TTSConfig) -> tuple[float, float]:
    """Accuracy and mean samples per problem of `config` replayed on every problem."""
    results = [replay(s, config) for s in samples]
    correct = sum(equivalent(r["answer"], g) for r, g in zip(results, gold, strict=True))
    return correct / len(gold), sum(r["num_samples"] for r in results) / len(gold)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a `thrifty eval` JSON")
    ap.add_argument("--confidences", default="0.6,0.7,0.8,0.9,0.95")
    ap.add_argument("--waves", default="1,2,4")
    args = ap.parse_args()
    gold, samples, n = load(args.results)
    base = TTSConfig(n=n)
    print(f"{args.results.name}: {len(gold)} problems, {n} samples each\n")
    print("| rule | wave | confidence | accuracy | samples / problem |")
    print("|---|---|---|---|---|")
    for k in sorted({1, 2, 4, 8, n}):
        if k <= n:
            cfg = dataclasses.replace(base, strategy="self-consistency", n=k)
            acc, used = score(gold, samples, cfg)
            print(f"| self-consistency@{k} | | | {100 * acc:.1f}% | {used:.2f} |")
    for rule in ("beta", "dirichlet"):
        for wave in (int(w) for w in args.waves.split(",")):
            for c in (float(c) for c in args.confidences.split(",")):
                cfg = dataclasses.replace(
                    base, strategy="adaptive", stopping_rule=rule, wave=wave, confidence=c
                )
                acc, used = score(gold, samples, cfg)
                print(f"| {rule} | {wave} | {c:g} | {100 * acc:.1f}% | {used:.2f} |")


if __name__ == "__main__":
    main()
