"""benchmarks/tts_stopping_bound.py's backward induction finds the best stopping policy over
vote states: on a small scripted set, with every order of every problem's samples (so that the
samples are exactly exchangeable), no policy in the whole space of them does better at any price
per sample. The README's claim that its fit-on-itself figure is a ceiling for count-based rules
rests on this."""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import tts_stopping_bound as bound  # noqa: E402

N = 4


def walks() -> list:
    rng = random.Random(0)
    out = []
    for _ in range(12):
        kinds = rng.choice([2, 3, 4])
        answers = rng.choices(
            ["1", "2", "3", None][:kinds], [rng.random() for _ in range(kinds)], k=N
        )
        gold = rng.choice(["1", "2"])
        out.extend(bound.walk(list(perm), gold.__eq__) for perm in itertools.permutations(answers))
    return out


@pytest.mark.parametrize("price", [0.0, 0.02, 0.1])
def test_backward_induction_beats_every_policy(price: float) -> None:
    data = walks()
    model = bound.fit([data])
    last = {s for s in model[0] if s[0] == N}
    choices = sorted(s for s in model[0] if s[0] < N)
    assert 6 <= len(choices) <= 16  # a space worth searching, small enough to search whole

    def value(stop: set) -> float:
        accuracy, samples = bound.score(data, stop)
        return accuracy - price * samples

    found = value(bound.policy(model, price))
    best = max(
        value(last | {s for s, on in zip(choices, bits, strict=True) if on})
        for bits in itertools.product((False, True), repeat=len(choices))
    )
    assert found == pytest.approx(best)
    # and the set is no trivial one: stopping at once and never stopping both do worse
    assert found > value(last) and found > value(set(model[0]))
