"""A stopping rule learned from data, as a bound on what vote counts alone can do.

For each state of a vote (samples drawn, the three largest counts, abstentions, a tie at the
top), the chance that the current leader is also the winner after all N samples, counted over
many orders of one run's samples (Laplace-smoothed). The rule stops at the first state whose
chance reaches a confidence. Fit on one `thrifty eval` run, tested on another and on itself
(in-sample: the best a count-based rule could do there), each averaged over sample orders,
against self-consistency@N on the same orders. No model runs; a few minutes.

    python benchmarks/tts_stopping_table.py \
        benchmarks/results/tts_basic_arithmetic_qwen05b_200_384tok.json \
        benchmarks/results/tts_basic_arithmetic_qwen05b_200_384tok_seed1000.json
"""

from __future__ import annotations

import argparse
import collections
import random
from pathlib import Path

from tts_stopping import floats  # this script's folder is on sys.path when it runs

from thrifty.errors import ThriftyError
from thrifty.tts.equivalence import equivalent
from thrifty.tts.eval import read_samples
from thrifty.tts.extract import canonical
from thrifty.tts.voting import tally

Problem = tuple[list[str | None], str]  # each sample's canonical answer, and the gold answer


def load(path: Path) -> tuple[list[Problem], int]:
    gold, samples, n = read_samples(path)
    return [([canonical(s.answer) for s in p], g) for p, g in zip(samples, gold, strict=True)], n


def leader(keys: list[str | None]) -> tuple[str | None, tuple[int, ...]]:
    """The leading answer (as the vote picks it) and the vote counts, largest first."""
    votes = tally(keys, symbolic=False)
    return (votes[0].answer if votes else None), tuple(
        sorted((v.count for v in votes), reverse=True)
    )


def state(keys: list[str | None]) -> tuple:
    _, counts = leader(keys)
    tie = len(counts) > 1 and counts[0] == counts[1]
    return len(keys), counts[:3], min(sum(k is None for k in keys), 2), tie


def orders(problems: list[Problem], count: int):
    for keys, gold in problems:
        for k in range(count):
            shuffled = list(keys)
            if k:
                random.Random(k).shuffle(shuffled)
            yield shuffled, gold


def fit(problems: list[Problem], n: int, count: int) -> dict[tuple, float]:
    hit, total = collections.Counter(), collections.Counter()
    for keys, _ in orders(problems, count):
        final, _ = leader(keys)
        for k in range(1, n):
            now, _ = leader(keys[:k])
            seen = state(keys[:k])
            total[seen] += 1
            hit[seen] += now is not None and now == final
    return {s: (hit[s] + 1) / (total[s] + 2) for s in total}


def evaluate(problems: list[Problem], n: int, table: dict, confidence: float, count: int):
    """Accuracy of the rule, mean samples, and self-consistency@n's accuracy (percent)."""
    right = used = full = 0
    for keys, gold in orders(problems, count):
        final, _ = leader(keys)
        full += final is not None and equivalent(final, gold)
        k = next(
            (
                k
                for k in range(1, n)
                if table.get(state(keys[:k]), 0.0) >= confidence and leader(keys[:k])[0]
            ),
            n,
        )
        now, _ = leader(keys[:k])
        right += now is not None and equivalent(now, gold)
        used += k
    m = len(problems) * count
    return 100 * right / m, used / m, 100 * full / m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "runs",
        type=Path,
        nargs=2,
        help="two `thrifty eval` JSONs: each is fit on, the other tested",
    )
    ap.add_argument("--confidences", default="0.8,0.85,0.9,0.95")
    ap.add_argument("--fit-orders", type=int, default=50)
    ap.add_argument("--orders", type=int, default=20)
    args = ap.parse_args()
    confidences = floats("--confidences", args.confidences)
    if min(args.fit_orders, args.orders) < 1:
        raise SystemExit("--fit-orders and --orders must be at least 1")
    runs = [load(p) for p in args.runs]
    print(
        "| fit on | tested on | confidence | accuracy | samples | self-consistency@N "
        "| in-sample accuracy | samples | self-consistency@N |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (train, n), (test, _), a, b in ((*runs, *args.runs), (*runs[::-1], *args.runs[::-1])):
        table = fit(train, n, args.fit_orders)
        for c in confidences:
            out = evaluate(test, n, table, c, args.orders)
            ins = evaluate(train, n, table, c, args.orders)
            print(
                f"| {a.stem} | {b.stem} | {c:g} | {out[0]:.1f}% | {out[1]:.2f} | {out[2]:.1f}% "
                f"| {ins[0]:.1f}% | {ins[1]:.2f} | {ins[2]:.1f}% |"
            )


if __name__ == "__main__":
    try:
        main()
    except ThriftyError as e:  # a file that is no sweep
        raise SystemExit(str(e)) from None
