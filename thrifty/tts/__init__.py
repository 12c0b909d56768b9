"""Test-time scaling: spend more inference compute on one prompt for a better answer.

Built only on the engine's public API. `run_strategy(engine, prompt, config)` runs one of
greedy, self-consistency, adaptive consistency, deepconf (confidence-weighted votes with early
termination) or best-of-n; `ThinkingBudget` caps or stretches a `<think>` block. The names load
on first use (the command line's flags need the config, not the engine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from thrifty.lazy import exports

if TYPE_CHECKING:
    from thrifty.tts.config import STRATEGIES, TTSConfig
    from thrifty.tts.equivalence import equivalent
    from thrifty.tts.extract import canonical, extract_answer
    from thrifty.tts.runner import JobSet, run_jobs, run_strategy
    from thrifty.tts.strategies import Job
    from thrifty.tts.thinking import ThinkingBudget

__all__ = [
    "STRATEGIES",
    "Job",
    "JobSet",
    "TTSConfig",
    "ThinkingBudget",
    "canonical",
    "equivalent",
    "extract_answer",
    "run_jobs",
    "run_strategy",
]
__getattr__ = exports(
    globals(),
    {
        "STRATEGIES": "thrifty.tts.config",
        "TTSConfig": "thrifty.tts.config",
        "equivalent": "thrifty.tts.equivalence",
        "canonical": "thrifty.tts.extract",
        "extract_answer": "thrifty.tts.extract",
        "JobSet": "thrifty.tts.runner",
        "run_jobs": "thrifty.tts.runner",
        "run_strategy": "thrifty.tts.runner",
        "Job": "thrifty.tts.strategies",
        "ThinkingBudget": "thrifty.tts.thinking",
    },
)
