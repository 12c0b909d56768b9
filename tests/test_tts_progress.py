"""`thrifty run --strategy`'s progress bar: it counts samples and tokens, and changes nothing."""

from __future__ import annotations

from test_tts_strategies import FakeEngine, answers

from thrifty.tts import TTSConfig
from thrifty.tts.cli import Progress
from thrifty.tts.runner import run_strategy


def test_progress_counts_every_sample_and_changes_no_answer():
    scripts = {"Q1": answers("42", "42", "7", "42")}
    config = TTSConfig(strategy="self-consistency", n=4, seed=0, max_tokens=32)
    plain = run_strategy(FakeEngine(scripts), "Q1 x", config)
    with Progress(FakeEngine(scripts), config.n) as engine:
        shown = run_strategy(engine, "Q1 x", config)
        assert engine.samples == 4
        assert engine.tokens == plain["tokens"] > 0
    assert shown["answer"] == plain["answer"] == "42"
    assert shown["votes"] == plain["votes"]
