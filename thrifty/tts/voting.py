"""Votes over extracted answers, and the adaptive-consistency stopping rule.

Answers are grouped by `canonical` form (so "1,000" and "1000.0" are one vote) and, optionally,
by symbolic equivalence. Ties go to the answer that appeared first, so the result never depends
on dict order or on a random draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import comb

from thrifty.errors import ThriftyError
from thrifty.tts.equivalence import equivalent
from thrifty.tts.extract import canonical, to_number

STOPPING_RULES = ("beta", "dirichlet", "predictive")


@dataclass
class Vote:
    answer: str  # the first raw answer seen for this group
    count: int
    weight: float
    first: int  # index of the sample that first gave it


def tally(
    answers: list[str | None], weights: list[float] | None = None, *, symbolic: bool = False
) -> list[Vote]:
    """Votes per distinct answer, best first (weight, then earliest); None answers abstain."""
    weights = weights if weights is not None else [1.0] * len(answers)
    if len(weights) != len(answers):
        raise ThriftyError("one weight per answer")
    groups: dict[str, Vote] = {}
    for i, (answer, w) in enumerate(zip(answers, weights, strict=True)):
        key = canonical(answer)
        if key is None or answer is None:
            continue
        if key not in groups and symbolic and to_number(answer) is None:
            # Only non-numeric answers need sympy: numbers already share a canonical key.
            key = next((k for k, v in groups.items() if equivalent(v.answer, answer)), key)
        vote = groups.setdefault(key, Vote(answer, 0, 0.0, i))
        vote.count += 1
        vote.weight += w
    return sorted(groups.values(), key=lambda v: (-v.weight, v.first))


def beta_confidence(top: int, second: int) -> float:
    """P(p_top > p_second) for p ~ Beta(top + 1, second + 1) (Aggarwal et al. 2023).

    For integer parameters, P(X > 1/2) for X ~ Beta(a, b) is P(Binomial(a + b - 1, 1/2) < a).
    """
    n = top + second + 1
    return sum(comb(n, k) for k in range(top + 1)) / 2**n


def dirichlet_confidence(counts: list[int], samples: int = 4000, seed: int = 0) -> float:
    """P(the leading answer's share is the largest) under Dirichlet(counts + 1), Monte Carlo
    with a fixed seed so that the same counts always give the same decision."""
    import numpy as np  # here, not at import: the command line imports this module for its names

    if len(counts) < 2:
        counts = [*counts, 0][:2] if counts else [0, 0]
    alpha = np.asarray(counts, dtype=np.float64) + 1
    draws = np.random.default_rng(seed).dirichlet(alpha, size=samples)
    return float((draws.argmax(axis=1) == int(np.argmax(alpha))).mean())


def predictive_confidence(
    votes: list[Vote],
    remaining: int,
    abstained: int = 0,
    concentration: float = 1.0,
    samples: int = 2000,
    seed: int = 0,
) -> float:
    """P(the current leader still wins once `remaining` more samples are in): the question an
    adaptive run with a fixed budget actually asks, since stopping early loses only where the full
    budget would have voted differently.

    The next answers are drawn from the posterior predictive of a Dirichlet process over answers
    (a Polya urn): an answer seen c times comes next with probability c / (k + concentration),
    an answer not seen yet with probability concentration / (k + concentration), after k samples.
    Samples that gave no answer (`abstained`) are a category that is drawn but never wins. Ties go
    to the answer that appeared first, as in tally. Monte Carlo with a fixed seed, so the same
    votes always give the same decision."""
    if not votes:
        return 0.0
    if remaining <= 0:
        return 1.0
    import numpy as np

    # only the order in which the answers first appeared matters (it breaks ties), so states
    # that differ in nothing else share one cached estimate
    ranks = np.argsort(np.argsort([v.first for v in votes]))
    return _predictive(
        tuple(v.count for v in votes),
        tuple(int(r) for r in ranks),
        remaining,
        abstained,
        concentration,
        samples,
        seed,
    )


@lru_cache(maxsize=1 << 16)
def _predictive(
    counts_seen: tuple[int, ...],
    ranks: tuple[int, ...],
    remaining: int,
    abstained: int,
    concentration: float,
    samples: int,
    seed: int,
) -> float:
    import numpy as np

    m = len(counts_seen)
    width = m + 1 + remaining  # the answers seen, the abstentions, and room for new answers
    counts = np.zeros((samples, width))
    counts[:, :m] = counts_seen
    counts[:, m] = abstained
    # order of first appearance; new answers come after every answer seen
    first = np.concatenate([ranks, [np.inf], 1e9 + np.arange(remaining)])
    rng = np.random.default_rng(seed)
    rows = np.arange(samples)
    new_slots = np.full(samples, m + 1)
    for _ in range(remaining):
        total = counts.sum(axis=1)
        u = rng.random(samples) * (total + concentration)
        cumulative = np.cumsum(counts, axis=1)
        pick = (cumulative <= u[:, None]).sum(axis=1)  # == width where u falls on the new mass
        is_new = pick >= width
        pick[is_new] = new_slots[is_new]
        new_slots += is_new
        counts[rows, pick] += 1
    counts[:, m] = -1  # abstentions never win
    best = counts.max(axis=1, keepdims=True)
    winner = np.where(counts == best, first, np.inf).argmin(axis=1)
    return float((winner == 0).mean())


def consensus(votes: list[Vote]) -> float:
    """The leading answer's share of the (weighted) votes; 0 with no votes."""
    total = sum(v.weight for v in votes)
    return votes[0].weight / total if votes and total > 0 else 0.0


def settled(votes: list[Vote], remaining: int) -> bool:
    """Whether `remaining` more samples can no longer change the winner of `votes` (counts, as
    tally orders them): not even if every one of them went to the runner-up or to a new answer.
    Ties go to the earlier answer, as in tally. Stopping here loses nothing against drawing all
    of them."""
    if not votes:
        return remaining == 0
    lead = votes[0]
    if len(votes) == 1:
        return lead.count >= remaining  # a new answer could at most tie, and it comes later
    gap = lead.count - votes[1].count
    return gap > remaining or (gap == remaining and lead.first < votes[1].first)


def vote_confidence(
    votes: list[Vote], rule: str = "beta", remaining: int = 0, abstained: int = 0
) -> float:
    """How sure the current vote is that its leader would stay the leader with more samples:
    with any number of them (beta, dirichlet), or with the `remaining` samples of the budget
    (predictive)."""
    if rule == "predictive":
        return predictive_confidence(votes, remaining, abstained)
    counts = [v.count for v in sorted(votes, key=lambda v: -v.count)]
    if rule == "beta":
        return beta_confidence(counts[0] if counts else 0, counts[1] if len(counts) > 1 else 0)
    if rule == "dirichlet":
        return dirichlet_confidence(counts)
    raise ThriftyError(f"unknown stopping rule {rule!r}; use {', '.join(STOPPING_RULES)}")


def decided(
    answers: list[str | None], drawn: int, budget: int, rule: str, confidence: float
) -> bool:
    """Adaptive consistency's stop: `answers` came from `drawn` samples (any others, such as
    traces DeepConf stopped early, gave none) of a `budget`; stop once the leader is sure under
    `rule` at `confidence`, or once the rest of the budget could not change the winner.
    Answers are grouped exactly and numerically, never waiting on sympy (the final vote merges
    symbolically equal ones)."""
    votes = tally(answers, symbolic=False)
    remaining = budget - drawn
    if settled(votes, remaining):
        return True
    abstained = drawn - sum(v.count for v in votes)
    return bool(votes) and vote_confidence(votes, rule, remaining, abstained) >= confidence
