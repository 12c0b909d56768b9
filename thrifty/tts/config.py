"""What a test-time scaling request asks for: one frozen config, validated where it is built."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from thrifty.errors import ThriftyError
from thrifty.tts.voting import STOPPING_RULES

STRATEGIES = ("greedy", "self-consistency", "adaptive", "deepconf", "best-of-n")
DEEPCONF_STOPS = ("consensus", "adaptive")

# (prompt, completion text) -> score; the highest-scoring completion wins best-of-n.
Scorer = Callable[[str, str], float]


@dataclass(frozen=True)
class TTSConfig:
    strategy: str = "self-consistency"
    n: int = 8  # samples; the most samples for adaptive and deepconf
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    max_tokens: int = 512
    seed: int | None = None
    # adaptive consistency (and DeepConf after its warm-up): samples per wave, and when the
    # vote counts as decided
    wave: int = 2
    confidence: float = 0.95
    stopping_rule: str = "predictive"  # or "beta", "dirichlet" (see tts.voting)
    # deepconf: warm-up traces, the share of them a trace must match to go on, window size,
    # and the confidence-weighted share of the leading answer at which no more traces are drawn
    # (None: draw all n)
    warmup: int = 4
    keep: float = 0.9
    window: int = 32
    consensus: float | None = 0.95
    # when DeepConf draws no more traces: "consensus" (the paper's, the share above) or
    # "adaptive" (adaptive consistency's stopping_rule at `confidence` over the finished traces,
    # those stopped early counting as drawn without an answer)
    deepconf_stop: str = "adaptive"
    top_logprobs: int = 5
    early_stop: bool = True  # False: weight votes by confidence but let every trace finish
    # best-of-n: None scores by mean log-probability
    scorer: Scorer | None = None
    symbolic: bool = True  # merge votes for symbolically equal answers (sympy)
    # only answers that are numbers vote (a math task's): any other, such as a placeholder
    # echoed from the prompt ("The answer is N") or a line of code, counts as no answer
    numeric: bool = False
    max_thinking_tokens: int | None = None
    min_thinking_tokens: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}"),
            (self.n >= 1, "n must be at least 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.wave >= 1, "wave must be at least 1"),
            (0.5 <= self.confidence < 1, "confidence must be in [0.5, 1)"),
            (
                self.stopping_rule in STOPPING_RULES,
                f"stopping_rule must be one of {', '.join(STOPPING_RULES)}",
            ),
            (0 < self.keep <= 1, "keep must be in (0, 1]"),
            (
                self.consensus is None or 0.5 < self.consensus <= 1,
                "consensus must be in (0.5, 1], or null to draw all n traces",
            ),
            (
                self.deepconf_stop in DEEPCONF_STOPS,
                f"deepconf_stop must be one of {', '.join(DEEPCONF_STOPS)}",
            ),
            (self.window >= 1, "window must be at least 1"),
            (1 <= self.top_logprobs <= 20, "top_logprobs must be in [1, 20]"),
            (
                self.strategy != "deepconf" or 1 <= self.warmup < self.n or not self.early_stop,
                "deepconf with early stopping needs 1 <= warmup < n",
            ),
            (self.scorer is None or callable(self.scorer), "scorer must be callable"),
        ]
        for ok, message in checks:
            if not ok:
                raise ThriftyError(message)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TTSConfig:
        """From a JSON object (the server's `test_time_scaling` field); rejects unknown keys."""
        if not isinstance(d, dict):
            raise ThriftyError("test_time_scaling must be an object")
        names = {f.name for f in dataclasses.fields(TTSConfig)} - {"scorer"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ThriftyError(f"unknown test_time_scaling field(s): {', '.join(unknown)}")
        try:
            return TTSConfig(**d)
        except TypeError as e:
            raise ThriftyError(f"bad test_time_scaling: {e}") from None
