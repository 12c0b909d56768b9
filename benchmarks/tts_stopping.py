"""Adaptive-consistency stopping rules and DeepConf settings replayed on a recorded sweep.

`thrifty eval` keeps every sample its largest self-consistency run drew (answer and length, in
draw order: `per_problem[i]["drawn"]`; with `--save-confidences`, each token's confidence too).
Samples of one prompt are independent, so any stopping rule can be replayed on them offline,
exactly as the online job would decide (thrifty.tts.replay). This sweeps adaptive consistency's
rule (Beta, Dirichlet, predictive), wave size and confidence, and, where confidences were kept,
DeepConf's window, warm-up, keep share and consensus stop, printing accuracy, samples and tokens
per problem beside self-consistency. No model runs; a sweep takes seconds to minutes.
`--orders K` averages every row over K orders of each problem's samples (the recorded order
first): one order's accuracy depends on which samples happened to come first, by a few points.

    python benchmarks/tts_stopping.py benchmarks/results/tts_basic_arithmetic_qwen05b_200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from pathlib import Path

from thrifty.errors import ThriftyError
from thrifty.tts.config import TTSConfig
from thrifty.tts.equivalence import equivalent
from thrifty.tts.eval import read_samples
from thrifty.tts.replay import Sample, replay
from thrifty.tts.voting import STOPPING_RULES


def orders(samples: list[list[Sample]], count: int) -> list[list[list[Sample]]]:
    """Every problem's samples in the recorded order, then in `count - 1` random orders (seeded):
    the samples of one prompt are exchangeable, so each order is as valid a draw as the recorded
    one, and averaging a stopping rule over orders removes the luck of which samples came first."""
    shuffled = [samples]
    for k in range(1, count):
        rng = random.Random(k)
        shuffled.append([rng.sample(s, len(s)) for s in samples])
    return shuffled


def score(
    gold: list[str], runs: list[list[list[Sample]]], config: TTSConfig
) -> tuple[float, float, float]:
    """Accuracy, mean samples and mean tokens per problem of `config` replayed on every problem,
    averaged over the sample orders in `runs`."""
    results = [replay(s, config) for samples in runs for s in samples]
    golds = gold * len(runs)
    correct = sum(equivalent(r["answer"], g) for r, g in zip(results, golds, strict=True))
    mean = lambda key: sum(r[key] for r in results) / len(golds)  # noqa: E731
    return correct / len(golds), mean("num_samples"), mean("tokens")


def floats(flag: str, text: str, none: bool = False) -> list:
    """ "0.8,0.9" -> [0.8, 0.9]; "none" is None where `none` allows it; else a one-line exit."""
    try:
        return [None if none and x == "none" else float(x) for x in text.split(",")]
    except ValueError:
        extra = " or none" if none else ""
        raise SystemExit(f"{flag} must be comma-separated numbers{extra}, not {text!r}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a `thrifty eval` JSON")
    ap.add_argument(
        "--orders",
        type=int,
        default=1,
        help="average every row over this many sample orders: the recorded one, then random ones",
    )
    ap.add_argument("--confidences", default="0.6,0.7,0.8,0.9,0.95")
    ap.add_argument("--waves", default="1,2,4")
    ap.add_argument("--rules", default=",".join(STOPPING_RULES))
    ap.add_argument("--windows", default="16,32,64", help="DeepConf windows")
    ap.add_argument("--warmups", default="4,8", help="DeepConf warm-up traces")
    ap.add_argument("--keeps", default="0.5,0.9", help="DeepConf keep shares")
    ap.add_argument("--consensus", default="0.8,0.9,0.95,none", help="DeepConf consensus stops")
    ap.add_argument(
        "--deepconf-rules",
        default="predictive",
        help="adaptive-consistency rules to sweep as DeepConf's stop, at each --confidences",
    )
    args = ap.parse_args()
    confidences = floats("--confidences", args.confidences)
    keeps = floats("--keeps", args.keeps)
    shares = floats("--consensus", args.consensus, none=True)
    if args.orders < 1:
        raise SystemExit(f"--orders must be at least 1, not {args.orders}")
    gold, samples, n = read_samples(args.results)
    runs = orders(samples, args.orders)
    base = TTSConfig(n=n)
    per = f", averaged over {args.orders} sample orders" if args.orders > 1 else ""
    print(f"{args.results.name}: {len(gold)} problems, {n} samples each{per}\n")
    print("| strategy | rule | wave | confidence | accuracy | samples | tokens |")
    print("|---|---|---|---|---|---|---|")
    for k in sorted({1, 2, 4, 8, n}):
        if k <= n:
            cfg = dataclasses.replace(base, strategy="self-consistency", n=k)
            acc, used, tokens = score(gold, runs, cfg)
            print(f"| self-consistency@{k} | | | | {100 * acc:.1f}% | {used:.2f} | {tokens:.0f} |")
    for rule in args.rules.split(","):
        for wave in (int(w) for w in args.waves.split(",")):
            for c in confidences:
                cfg = dataclasses.replace(
                    base, strategy="adaptive", stopping_rule=rule, wave=wave, confidence=c
                )
                acc, used, tokens = score(gold, runs, cfg)
                print(
                    f"| adaptive | {rule} | {wave} | {c:g} | {100 * acc:.1f}% | {used:.2f} "
                    f"| {tokens:.0f} |"
                )
    if not samples[0][0].token_confidences:
        print("\n(no token confidences recorded: rerun with --save-confidences for DeepConf)")
        return
    # DeepConf's stops: the paper's consensus share (or none: all n), or adaptive consistency's
    stops = [("consensus", c, base.stopping_rule, base.confidence) for c in shares]
    stops += [
        ("adaptive", None, rule, c)
        for rule in args.deepconf_rules.split(",")
        if rule
        for c in confidences
    ]
    print("\n| window | warm-up | keep | stop | accuracy | traces | tokens |")
    print("|---|---|---|---|---|---|---|")
    for window in (int(w) for w in args.windows.split(",")):
        for warmup in (int(w) for w in args.warmups.split(",")):
            for keep in keeps:
                for how, share, rule, confidence in stops:
                    cfg = dataclasses.replace(
                        base,
                        strategy="deepconf",
                        window=window,
                        warmup=warmup,
                        keep=keep,
                        consensus=share,
                        deepconf_stop=how,
                        stopping_rule=rule,
                        confidence=confidence,
                    )
                    acc, used, tokens = score(gold, runs, cfg)
                    stop = f"{rule} {confidence:g}" if how == "adaptive" else f"consensus {share}"
                    print(
                        f"| {window} | {warmup} | {keep:g} | {stop} | {100 * acc:.1f}% "
                        f"| {used:.2f} | {tokens:.0f} |"
                    )


if __name__ == "__main__":
    try:
        main()
    except ThriftyError as e:  # a file that is no sweep, a setting TTSConfig rejects (0.3)
        raise SystemExit(str(e)) from None
