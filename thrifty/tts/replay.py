"""Strategies replayed on recorded samples: what adaptive consistency and DeepConf would have
decided, read off one self-consistency run.

Samples of one prompt are independent draws, so the first k samples of a run are a valid draw
of k, in the order a strategy would have asked for them. A sweep can therefore run the largest
self-consistency once (recording each token's confidence) and derive self-consistency@k,
adaptive consistency at any confidence and DeepConf at any `keep` from it, with the same
decisions the online jobs in strategies.py make step by step. Only wall time is not derived.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from thrifty.tts.confidence import threshold_from_warmup, trace_confidence
from thrifty.tts.config import TTSConfig
from thrifty.tts.voting import consensus, decided, tally


@dataclass(frozen=True)
class Sample:
    """One recorded sample: its extracted answer, its length, and each token's confidence
    (needed only to replay DeepConf)."""

    answer: str | None
    tokens: int
    token_confidences: tuple[float, ...] = ()


def _result(answer: str | None, tokens: int, samples: int, stopped: int = 0) -> dict[str, Any]:
    return {
        "answer": answer,
        "tokens": tokens,
        "num_samples": samples,
        "num_stopped_early": stopped,
    }


def _winner(answers: list[str | None], weights: list[float] | None, symbolic: bool):
    votes = tally(answers, weights, symbolic=symbolic)
    return votes[0].answer if votes else None


def self_consistency(samples: list[Sample], k: int, symbolic: bool = True) -> dict[str, Any]:
    """Majority vote of the first k samples."""
    used = samples[:k]
    return _result(
        _winner([s.answer for s in used], None, symbolic), sum(s.tokens for s in used), len(used)
    )


def adaptive(samples: list[Sample], config: TTSConfig) -> dict[str, Any]:
    """Waves of `config.wave` samples until the stopping rule is sure (as Job._next decides)."""
    n = min(config.n, len(samples))
    used = 0
    while used < n:
        used += min(config.wave, n - used)
        answers = [s.answer for s in samples[:used]]
        # the budget the online job has: config.n, even where fewer samples were recorded
        if decided(answers, used, config.n, config.stopping_rule, config.confidence):
            break
    return self_consistency(samples, used, config.symbolic)


def stop_point(confidences: tuple[float, ...], window: int, threshold: float) -> int | None:
    """Tokens generated when a trace is stopped: the first full window whose mean falls below
    the threshold (the trace's last token finishes it and is never checked); None: not stopped."""
    total = 0.0
    for i, c in enumerate(confidences[:-1]):
        total += c - (confidences[i - window] if i >= window else 0.0)
        if i >= window - 1 and total / window < threshold:
            return i + 1
    return None


def deepconf(samples: list[Sample], config: TTSConfig) -> dict[str, Any]:
    """DeepConf as Job runs it. Online: warm-up traces set the threshold; later traces come in
    waves, each stopped where its windowed confidence drops below the threshold, until the
    finished traces' confidence-weighted vote reaches `consensus`; every finished trace votes,
    weighted. Offline (no early stopping): all n finish and the most confident `keep` share vote."""
    n = min(config.n, len(samples))
    confs = [trace_confidence(list(s.token_confidences), config.window) for s in samples[:n]]
    if not config.early_stop:
        ranked = sorted(range(n), key=lambda i: -confs[i])[: math.ceil(config.keep * n)]
        votes = [samples[i].answer for i in ranked]
        answer = _winner(votes, [confs[i] for i in ranked], config.symbolic)
        return _result(answer, sum(s.tokens for s in samples[:n]), n)
    used = min(config.warmup, n)
    threshold = threshold_from_warmup(confs[:used], config.keep)
    finished, tokens, stopped = list(range(used)), 0, 0

    def agreed() -> bool:  # as Job._agreed
        answers = [samples[i].answer for i in finished]
        if config.deepconf_stop == "adaptive":
            return decided(answers, used, config.n, config.stopping_rule, config.confidence)
        if config.consensus is None:
            return False
        votes = tally(answers, [confs[i] for i in finished], symbolic=False)
        return consensus(votes) >= config.consensus

    while used < n and not agreed():
        for i in range(used, min(used + config.wave, n)):
            cut = stop_point(samples[i].token_confidences, config.window, threshold)
            if cut is None:
                finished.append(i)
            else:
                stopped += 1
                tokens += cut
        used = min(used + config.wave, n)
    tokens += sum(samples[i].tokens for i in finished)
    answers = [samples[i].answer for i in finished]
    answer = _winner(answers, [confs[i] for i in finished], config.symbolic)
    return _result(answer, tokens, used, stopped)


REPLAYABLE = {"adaptive": adaptive, "deepconf": deepconf}


def replay(samples: list[Sample], config: TTSConfig) -> dict[str, Any]:
    """The result `config`'s strategy would have reached on these samples, in this order."""
    if config.strategy == "self-consistency":
        return self_consistency(samples, config.n, config.symbolic)
    return REPLAYABLE[config.strategy](samples, config)
