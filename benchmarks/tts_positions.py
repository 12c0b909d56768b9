"""Each sample position of a `thrifty eval` run: how often sample k was right, and how many gave
no answer, over all problems. Samples of a problem are exchangeable, so with independent draws
every position reads alike; a position far off the others means problems shared random draws.

    python benchmarks/tts_positions.py \
        benchmarks/results/tts_basic_arithmetic_qwen05b_200_384tok.json \
        benchmarks/results/tts_basic_arithmetic_qwen05b_200_384tok_seed3000.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from thrifty.errors import ThriftyError
from thrifty.tts.equivalence import equivalent
from thrifty.tts.eval import read_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+", help="`thrifty eval` JSONs")
    for path in ap.parse_args().results:
        gold, samples, n = read_samples(path)
        right = [
            sum(equivalent(p[k].answer, g) for p, g in zip(samples, gold, strict=True))
            for k in range(n)
        ]
        none = [sum(p[k].answer is None for p in samples) for k in range(n)]
        print(f"{path.stem}: {len(gold)} problems")
        print("  right (%): " + " ".join(f"{100 * r / len(gold):.0f}" for r in right))
        print("  no answer: " + " ".join(map(str, none)))


if __name__ == "__main__":
    try:
        main()
    except ThriftyError as e:  # a file that is no sweep
        raise SystemExit(str(e)) from None
