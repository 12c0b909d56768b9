"""Trace confidence from top-k logprobs, after DeepConf (Fu et al. 2025, "Deep Think with
Confidence").

Token confidence is minus the mean log-probability of the k most likely tokens at that step: high
when the distribution is peaked. A group confidence is its mean over a sliding window of tokens;
a trace's confidence is its lowest group confidence (one confused stretch marks the whole trace).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from thrifty.engine.sequence import TokenLogprob


def token_confidence(lp: TokenLogprob) -> float:
    """-mean(top-k logprobs); with no top-k list, -logprob of the chosen token."""
    values = [v for _, v in lp.top] or [lp.logprob]
    return -sum(values) / len(values)


def group_confidences(confs: list[float], window: int) -> list[float]:
    """Means over every window of `window` consecutive tokens (one mean if the trace is shorter)."""
    if not confs:
        return []
    if len(confs) <= window:
        return [sum(confs) / len(confs)]
    c = np.cumsum([0.0, *confs])
    return ((c[window:] - c[:-window]) / window).tolist()


def trace_confidence(confs: list[float], window: int) -> float:
    """The lowest group confidence of a trace (0 for an empty trace)."""
    groups = group_confidences(confs, window)
    return min(groups) if groups else 0.0


def threshold_from_warmup(trace_confs: list[float], keep: float) -> float:
    """The confidence below which a new trace is stopped: traces as confident as the top `keep`
    share of the warm-up traces go on (keep=0.9 is DeepConf-high, 0.1 DeepConf-low)."""
    return float(np.percentile(trace_confs, 100 * (1 - keep)))


class WindowMonitor:
    """Online group confidence of one running trace."""

    def __init__(self, window: int):
        self.window = window
        self._last: deque[float] = deque(maxlen=window)
        self._sum = 0.0
        self.confs: list[float] = []

    def push(self, conf: float) -> float | None:
        """Add a token's confidence; the window's mean once the window is full, else None."""
        if len(self._last) == self.window:
            self._sum -= self._last[0]
        self._last.append(conf)
        self._sum += conf
        self.confs.append(conf)
        return self._sum / self.window if len(self._last) == self.window else None
