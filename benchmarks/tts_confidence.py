"""How well a trace's confidence tells right samples from wrong ones, on a recorded sweep.

DeepConf can only save tokens at equal accuracy if the traces it stops or down-weights are the
wrong ones. This reads the samples and token confidences a `thrifty eval --save-confidences` run
kept and prints, for several ways of reducing token confidences to one trace confidence (the
lowest sliding-window mean DeepConf uses, the mean, the last tokens, the bottom 10% of windows),
the AUROC of that confidence for "this sample's answer is right": pooled over every sample, and
within each problem that has both right and wrong samples (what a per-problem filter sees).
0.5 is chance. No model runs; seconds.

    python benchmarks/tts_confidence.py benchmarks/results/tts_basic_arithmetic_qwen05b_200.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from thrifty.errors import ThriftyError
from thrifty.tts.confidence import group_confidences, trace_confidence
from thrifty.tts.equivalence import equivalent
from thrifty.tts.eval import read_samples


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(a right sample's confidence > a wrong one's), ties counting half."""
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((p > n).mean() + 0.5 * (p == n).mean())


def reductions(window: int) -> dict[str, Callable[[list[float]], float]]:
    def bottom(confs: list[float]) -> float:
        groups = sorted(group_confidences(confs, window))
        return float(np.mean(groups[: max(1, len(groups) // 10)])) if groups else 0.0

    return {
        f"lowest window of {window} (DeepConf)": lambda c: trace_confidence(c, window),
        f"lowest window of {window // 2}": lambda c: trace_confidence(c, window // 2),
        "mean": lambda c: float(np.mean(c)) if c else 0.0,
        f"last {window} tokens": lambda c: float(np.mean(c[-window:])) if c else 0.0,
        f"bottom 10% of windows of {window}": bottom,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a `thrifty eval --save-confidences` JSON")
    ap.add_argument("--window", type=int, default=32)
    args = ap.parse_args()
    try:
        gold, samples, _ = read_samples(args.results)
    except ThriftyError as e:
        raise SystemExit(str(e)) from None
    if not samples[0][0].token_confidences:
        raise SystemExit(f"{args.results}: no token confidences (rerun with --save-confidences)")
    right = [
        [s.answer is not None and equivalent(s.answer, g) for s in ss]
        for g, ss in zip(gold, samples, strict=True)
    ]
    print(f"{args.results.name}: {sum(map(len, samples))} samples of {len(gold)} problems\n")
    print("| trace confidence | AUROC, pooled | AUROC, within a problem |")
    print("|---|---|---|")
    for name, reduce in reductions(args.window).items():
        pooled: tuple[list[float], list[float]] = ([], [])
        within = []
        for ss, ok in zip(samples, right, strict=True):
            confs = [reduce(list(s.token_confidences)) for s in ss]
            pos = [c for c, r in zip(confs, ok, strict=True) if r]
            neg = [c for c, r in zip(confs, ok, strict=True) if not r]
            pooled[0].extend(pos)
            pooled[1].extend(neg)
            if pos and neg:
                within.append(auroc(pos, neg))
        print(f"| {name} | {auroc(*pooled):.3f} | {np.mean(within):.3f} ({len(within)} problems) |")


if __name__ == "__main__":
    main()
