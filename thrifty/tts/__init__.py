"""Test-time scaling: spend more inference compute on one prompt for a better answer.

Built only on the engine's public API. `run_strategy(engine, prompt, config)` runs one of
greedy, self-consistency, adaptive consistency, deepconf (confidence-weighted votes with early
termination) or best-of-n; `ThinkingBudget` caps or stretches a `<think>` block.
"""

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
