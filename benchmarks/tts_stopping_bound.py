"""The most accurate stopping policy that sees only the vote counts, as a bound on adaptive
consistency.

What any count-based rule can see after k samples is the state (k, the votes per answer largest
first, the samples with no answer). The samples of one prompt are exchangeable, so given the
state, the order of the first k (and with it whether an earlier state stopped them) tells
nothing about the next, but for which of two tied answers leads: the best policy over states
follows from backward induction on the empirical chance that the leader is right in each state
and the empirical transitions between states. For a price per sample, stop where the leader's
chance beats the value of drawing on; sweeping the price traces accuracy against samples drawn.

Each run is scored twice, over `--orders` orders of each problem's samples (tts_stopping.orders):
with the policy fit on that same run (hindsight: a ceiling for rules without it) and with the
policy fit on the other runs given (held out). The table gives the best accuracy found at half
the samples (N/2 on average), beside self-consistency. No model runs; under a minute.

    python benchmarks/tts_stopping_bound.py \
        benchmarks/results/tts_basic_arithmetic_qwen05b_200_384tok{,_seed1000,_seed2000,_seed3000}.json
"""

from __future__ import annotations

import argparse
import collections
import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tts_stopping import orders  # this script's folder is on sys.path when it runs

from thrifty.errors import ThriftyError
from thrifty.tts.equivalence import equivalent
from thrifty.tts.eval import read_samples
from thrifty.tts.voting import tally

State = tuple[int, tuple[int, ...], int]  # samples drawn, votes per answer, samples with none
# after each sample: the state, and whether the leader is right
Trajectory = list[tuple[State, bool]]


def walk(answers: list[str | None], right: Callable[[str], bool]) -> Trajectory:
    """One order of a problem's answers, as the vote stands after each sample."""
    out = []
    for k in range(1, len(answers) + 1):
        votes = tally(answers[:k])
        counts = tuple(v.count for v in votes)  # largest first, as tally sorts them
        out.append(((k, counts, k - sum(counts)), bool(votes) and right(votes[0].answer)))
    return out


def trajectories(path: Path, count: int) -> tuple[list[Trajectory], int]:
    """Every problem's vote, sample by sample, in `count` orders of its samples."""
    gold, samples, n = read_samples(path)
    checked = [functools.cache(functools.partial(equivalent, b=g)) for g in gold]
    walks = [
        walk([s.answer for s in problem], right)
        for shuffled in orders(samples, count)
        for problem, right in zip(shuffled, checked, strict=True)
    ]
    return walks, n


def fit(runs: list[list[Trajectory]]) -> tuple[dict, dict]:
    """Per state: the leader's empirical chance of being right, and the next states' counts."""
    right, seen = collections.Counter(), collections.Counter()
    nxt: dict[State, collections.Counter] = collections.defaultdict(collections.Counter)
    for walks in runs:
        for walk in walks:
            for j, (s, ok) in enumerate(walk):
                right[s] += ok
                seen[s] += 1
                if j + 1 < len(walk):
                    nxt[s][walk[j + 1][0]] += 1
    return {s: right[s] / seen[s] for s in seen}, nxt


def policy(model: tuple[dict, dict], price: float) -> set[State]:
    """The states where the best policy at `price` per sample stops (backward induction)."""
    chance, nxt = model
    value: dict[State, float] = {}
    stop = set()
    for s in sorted(chance, key=lambda s: -s[0]):
        after = nxt.get(s)
        if not after:  # the last sample: nothing left to draw
            value[s] = chance[s]
            stop.add(s)
            continue
        go_on = sum(c * value[t] for t, c in after.items()) / sum(after.values()) - price
        value[s] = max(chance[s], go_on)
        if chance[s] >= go_on:
            stop.add(s)
    return stop


def score(walks: list[Trajectory], stop: set[State]) -> tuple[float, float]:
    """Accuracy and mean samples of a policy; a state it never saw draws on."""
    right = used = 0
    for walk in walks:
        s, ok = next(((s, ok) for s, ok in walk if s in stop), walk[-1])
        right += ok
        used += s[0]
    return right / len(walks), used / len(walks)


def best_within(
    walks: list[Trajectory], model: tuple[dict, dict], budget: float, prices: list[float]
) -> float:
    """The best accuracy at `budget` samples on average of the policies over `prices`, or of a
    mix of two (each problem drawing one of them at random: a policy too)."""
    points = [score(walks, policy(model, p)) for p in prices]
    best = max((a for a, used in points if used <= budget), default=float("nan"))
    for a, u in points:
        for b, v in points:
            if u < budget < v:
                best = max(best, a + (b - a) * (budget - u) / (v - u))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="`thrifty eval` JSONs of one N")
    ap.add_argument("--orders", type=int, default=20, help="sample orders per problem")
    ap.add_argument("--prices", type=int, default=121, help="prices per sample, 0 to 0.03")
    args = ap.parse_args()
    if args.orders < 1 or args.prices < 2:
        raise SystemExit("--orders must be at least 1 and --prices at least 2")
    data = [trajectories(p, args.orders) for p in args.runs]
    n = data[0][1]
    if any(m != n for _, m in data):
        raise SystemExit("every run must have drawn the same N samples per problem")
    prices = np.linspace(0, 0.03, args.prices).tolist()
    held = "fit on the other runs" if len(data) > 1 else "(give two or more runs)"
    print(f"{args.orders} orders per problem; the best policy at {n / 2:g} samples on average\n")
    print(f"| run | self-consistency@{n} | @{n // 2} | fit on itself (ceiling) | {held} |")
    print("|---|---|---|---|---|")
    for i, (path, (walks, _)) in enumerate(zip(args.runs, data, strict=True)):
        full = sum(w[-1][1] for w in walks) / len(walks)
        half = sum(w[n // 2 - 1][1] for w in walks) / len(walks)
        ceiling = best_within(walks, fit([walks]), n / 2, prices)
        others = [w for j, (w, _) in enumerate(data) if j != i]
        out = best_within(walks, fit(others), n / 2, prices) if others else float("nan")
        print(
            f"| {path.stem} | {100 * full:.1f}% | {100 * half:.1f}% | {100 * ceiling:.1f}% "
            f"| {100 * out:.1f}% |"
        )


if __name__ == "__main__":
    try:
        main()
    except ThriftyError as e:  # a file that is no sweep
        raise SystemExit(str(e)) from None
