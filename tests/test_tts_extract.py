"""Answer extraction, equivalence (with a timeout that works off the main thread), votes and
the stopping rule's arithmetic."""

from __future__ import annotations

import threading
import time
from fractions import Fraction

import pytest

from thrifty.tts import canonical, equivalent, extract_answer
from thrifty.tts.confidence import group_confidences, threshold_from_warmup, trace_confidence
from thrifty.tts.equivalence import latex_to_sympy
from thrifty.tts.extract import boxed, to_number
from thrifty.tts.voting import (
    beta_confidence,
    dirichlet_confidence,
    predictive_confidence,
    settled,
    tally,
    vote_confidence,
)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        (r"So $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{2}}{2}} and later \boxed{ 7 }", "7"),  # the last box
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not unbalance a box
        (r"\boxed{\text{(B)}}", r"\text{(B)}"),
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("#### 1,234.", "1,234"),
        ("The answer is 42.", "42"),
        (r"the final answer is \(15\).", "15"),
        (r"The answer is \[ -4 \]", "-4"),
        ("So the answer is: $-7$.", "-7"),
        ("The final answer is **12**", "12"),
        ("Answer: 3/4", "3/4"),
        ("The answer is 3.5 apples.", "3.5"),
        ("The answer is 2 + 3 = 5", "5"),
        ("The answer is 3x + 2.", "3x + 2"),
        ("The answer is 5. Then 7 more came.", "5"),
        ("the answer is x + 1, since x > 0", "x + 1"),
        ("First 12, then 15, so 1,500 in all", "1,500"),
        ("I think it is -0.25 or so", "-0.25"),
        ("no digits at all", None),
        ("3 + 4 = 7, so the answer is \\(", "7"),  # cut off after the marker: last number
        ("The answer is:\n\\[ 5 \\]", "5"),
        ("The answer is `-1`.", "-1"),
        ("The answer is \\(-131\\", "-131"),  # cut off inside "\\)"
        ("", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_extract_answer_without_the_last_number_fallback():
    assert extract_answer("Step 1: 3 + 4 = 7. Step 2", last_number=False) is None
    assert extract_answer("so the answer is 7. Then 8", last_number=False) == "7"
    assert extract_answer(r"\boxed{9} and 10", last_number=False) == "9"
    assert extract_answer("4 + 1 = 5, so the answer is \\", last_number=False) is None
    # a box cut off at max_tokens is no answer, not "\\boxed{-1"
    assert extract_answer("2 - 3 = -1, so the answer is \\boxed{-1", last_number=False) is None
    assert extract_answer("so the answer is \\boxed", last_number=False) is None


def test_boxed_unclosed_and_nested():
    assert boxed(r"\boxed{1 + \frac{2}{3}") is None
    assert boxed(r"\boxed{a{b{c}}d}") == "a{b{c}}d"
    assert boxed(r"\fbox{9}") == "9"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,000", Fraction(1000)),
        ("1000.0", Fraction(1000)),
        ("-0.50", Fraction(-1, 2)),
        ("3/4", Fraction(3, 4)),
        (r"\frac{3}{4}", Fraction(3, 4)),
        (r"\frac12", Fraction(1, 2)),
        (r"-\frac{6}{7}", Fraction(-6, 7)),
        ("50%", Fraction(1, 2)),
        ("$42$", Fraction(42)),
        ("1/0", None),
        ("x", None),
        ("12,34", None),  # not a thousands separator
        # a sampled answer can be anything Decimal parses; none of these is a usable number
        ("Infinity", None),
        ("-inf", None),
        ("NaN", None),
        ("inf/2", None),
        ("1e999999", None),  # exact, it would be a million-digit integer
        ("1e3", Fraction(1000)),
    ],
)
def test_to_number(text, value):
    assert to_number(text) == value


def test_canonical_keys():
    assert canonical("1,000") == canonical("1000.00") == "1000"
    assert canonical("Infinity") == "Infinity"  # votes as text instead of crashing the tally
    assert canonical("0.5") == canonical(r"\frac{1}{2}") == "1/2"
    assert canonical("x + 1") == "x+1"
    assert canonical(None) is None


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("0.5", r"\frac{1}{2}", True),
        ("1,000", "1000.0", True),
        ("50%", "0.5", True),
        ("3", "4", False),
        ("0.3333", "1/3", False),  # a rounded decimal is another answer
        ("0.1", "1/10", True),
        ("x^2+2x+1", "(x+1)^2", True),
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", True),
        (r"2\pi", r"\pi \cdot 2", True),
        ("x + 1", "x + 2", False),
        ("y = 2x", "2x = y", True),
        ("(B)", "(C)", False),
        ("hello", None, False),
    ],
)
def test_equivalent(a, b, same):
    assert equivalent(a, b) is same


def test_latex_to_sympy():
    assert latex_to_sympy(r"\frac{\frac{1}{2}}{3}") == "((((1)/(2)))/(3))"
    assert latex_to_sympy(r"\sqrt{x}^2 \cdot 3") == "sqrt(x)**2 * 3"


def test_equivalence_timeout_works_in_threads():
    # An expansion sympy cannot finish: the call returns False on time, from a worker thread
    # (where SIGALRM-based timeouts cannot work), and the next call still works.
    results = []

    def work():
        t = time.perf_counter()
        results.append(equivalent("(x+y+1)**4000", "(x+y)**4000 + 1", timeout=0.5))
        results.append(time.perf_counter() - t)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results[0::2] == [False, False]
    assert max(results[1::2]) < 10
    assert equivalent("x*2", "2*x")


def test_tally_groups_equal_answers_and_breaks_ties_by_first_seen():
    votes = tally(["1/2", "0.5", "7", None, r"\frac{1}{2}", "7"])
    assert [(v.answer, v.count) for v in votes] == [("1/2", 3), ("7", 2)]
    votes = tally(["9", "4", "4", "9"])
    assert votes[0].answer == "9"  # 2-2: the first answer seen wins
    votes = tally(["x+1", "1+x", "2"], symbolic=True)
    assert [(v.answer, v.count) for v in votes] == [("x+1", 2), ("2", 1)]
    votes = tally(["x+1", "1+x"], symbolic=False)
    assert len(votes) == 2
    votes = tally(["7", "42", "42"], weights=[5.0, 1.0, 1.5])
    assert votes[0].answer == "7" and votes[1].weight == pytest.approx(2.5)


def test_beta_stopping_rule_matches_the_beta_distribution():
    # P(X > 1/2), X ~ Beta(a + 1, b + 1), checked against direct numerical integration.
    def integrate(a: int, b: int, steps: int = 200_000) -> float:
        xs = [(i + 0.5) / steps for i in range(steps)]
        dens = [x**a * (1 - x) ** b for x in xs]
        return sum(d for x, d in zip(xs, dens, strict=True) if x > 0.5) / sum(dens)

    for a, b in [(0, 0), (3, 0), (4, 0), (5, 2), (7, 1), (3, 3)]:
        assert beta_confidence(a, b) == pytest.approx(integrate(a, b), abs=1e-4)
    assert beta_confidence(3, 0) < 0.95 < beta_confidence(4, 0)
    assert dirichlet_confidence([4]) == pytest.approx(beta_confidence(4, 0), abs=0.02)
    assert dirichlet_confidence([3, 3, 3]) < 0.5
    votes = tally(["1", "1", "1", "1", "2"])
    assert vote_confidence(votes) == beta_confidence(4, 1)


def exact_predictive(counts: list[int], firsts: list[int], abstained: int, remaining: int):
    """P(answer 0 wins after `remaining` Polya-urn draws, concentration 1), by enumerating every
    path: the reference for predictive_confidence's Monte Carlo."""
    if remaining == 0:
        best = max(counts)
        winner = min(f for c, f in zip(counts, firsts, strict=True) if c == best)
        return Fraction(winner == firsts[0])
    total = sum(counts) + abstained + 1
    p = Fraction(abstained, total) * exact_predictive(counts, firsts, abstained, remaining - 1)
    for i, c in enumerate(counts):
        more = [*counts[:i], c + 1, *counts[i + 1 :]]
        p += Fraction(c, total) * exact_predictive(more, firsts, abstained, remaining - 1)
    new = exact_predictive([*counts, 1], [*firsts, 10**9 + len(firsts)], abstained, remaining - 1)
    return p + Fraction(1, total) * new


@pytest.mark.parametrize(
    "answers, remaining",
    [
        (["42", "7"], 1),  # 7 or a new answer ties 42, which came first: 2/3
        (["7", "42", "42"], 3),  # 42 leads, but 7 wins a tie
        (["42", "42", "7", None], 4),  # an abstention dilutes the urn and never wins
        (["42"], 5),
        (["42", "7", "9", "42", None, None], 4),
    ],
)
def test_predictive_rule_matches_the_exact_polya_urn(answers, remaining):
    votes = tally(answers)
    abstained = answers.count(None)
    counts, firsts = [v.count for v in votes], [v.first for v in votes]
    exact = float(exact_predictive(counts, firsts, abstained, remaining))
    estimate = predictive_confidence(votes, remaining, abstained, samples=20_000)
    assert estimate == pytest.approx(exact, abs=0.015)  # 4 standard errors at most
    assert vote_confidence(votes, "predictive", remaining, abstained) == predictive_confidence(
        votes, remaining, abstained
    )


def test_predictive_rule_is_certain_exactly_when_the_vote_is_settled():
    for answers in (["42"] * 5, ["42", "7", "42", "42", "42"], ["7", "42", "42", "42"]):
        votes = tally(answers)
        for remaining in range(6):
            sure = predictive_confidence(votes, remaining) == 1.0
            assert sure == settled(votes, remaining), (answers, remaining)
    assert predictive_confidence([], 3) == 0.0
    # unanimity is worth more the fewer samples are left to draw
    votes = tally(["42"] * 3)
    assert predictive_confidence(votes, 13) < predictive_confidence(votes, 5) < 1.0


def test_trace_confidence_windows():
    confs = [3.0, 3.0, 3.0, 0.5, 0.5, 3.0]
    assert group_confidences(confs, 2) == [3.0, 3.0, 1.75, 0.5, 1.75]
    assert trace_confidence(confs, 2) == 0.5
    assert trace_confidence(confs, 10) == pytest.approx(13 / 6)  # shorter than a window
    assert trace_confidence([], 4) == 0.0
    # keep 90%: the 10th percentile of the warm-up traces' confidences
    assert threshold_from_warmup([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == pytest.approx(1.4)
    assert threshold_from_warmup([1.0, 2.0, 3.0], 1.0) == 1.0
