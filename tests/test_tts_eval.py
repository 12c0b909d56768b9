"""`thrifty eval`'s pieces: tasks, the sweep (nested self-consistency), results and plots, and
the CLI's input errors. The sweep runs on the scripted engine of test_tts_strategies."""

from __future__ import annotations

import json
import re

import pytest
from test_tts_strategies import FakeEngine, answers

from thrifty.cli import main
from thrifty.errors import ThriftyError
from thrifty.tts import TTSConfig
from thrifty.tts.eval import (
    cut_off_warning,
    evaluate,
    format_table,
    sweep_configs,
    write_results,
)
from thrifty.tts.tasks import Problem, all_numeric, load_problems, parse_options

PROBLEMS = [Problem("Q1 x", "42"), Problem("Q2 x", "9"), Problem("Q3 x", "9")]
SCRIPTS = {
    "Q1": answers("42", "42", "7", "42"),
    "Q2": answers("7", "9", "9", "9"),
    "Q3": answers("9"),
}


def test_sweep_configs():
    base = TTSConfig(temperature=0.5)
    configs = sweep_configs(["greedy", "self-consistency", "adaptive", "deepconf"], [4, 1, 2], base)
    assert [(c.strategy, c.n) for c in configs] == [
        ("greedy", 1),
        ("self-consistency", 1),
        ("self-consistency", 2),
        ("self-consistency", 4),
        ("adaptive", 4),
        ("deepconf", 4),
    ]
    assert configs[-1].warmup == 3 and configs[1].temperature == 0.5
    assert sweep_configs(["deepconf"], [2], base)[0].warmup == 1


def test_nested_self_consistency_reads_smaller_n_off_the_largest_run():
    engine = FakeEngine(SCRIPTS)
    configs = sweep_configs(["self-consistency"], [1, 2, 4], TTSConfig())
    rows = evaluate(engine, PROBLEMS, configs, progress=False, instruction="")
    by = {r["label"]: r for r in rows}
    # Q2's samples say 7, 9, 9, 9: wrong at N=1, a 1-1 tie going to 7 at N=2, right at N=4.
    assert [by[f"self-consistency@{n}"]["correct"] for n in (1, 2, 4)] == [2, 2, 3]
    length = len(answers("42")[0])
    assert [by[f"self-consistency@{n}"]["tokens_per_problem"] for n in (1, 2, 4)] == [
        length,
        2 * length,
        4 * length,
    ]
    assert by["self-consistency@4"]["wall_s"] > 0
    assert by["self-consistency@1"]["wall_s"] is None
    assert by["self-consistency@1"]["derived_from"] == "self-consistency@4"
    assert [p["answer"] for p in by["self-consistency@2"]["per_problem"]] == ["42", "7", "9"]
    q2 = by["self-consistency@4"]["per_problem"][1]["drawn"]
    assert q2 == [["7", length], ["9", length], ["9", length], ["9", length]]


def test_sweep_runs_every_strategy_and_writes_results(tmp_path):
    engine = FakeEngine(SCRIPTS)
    configs = sweep_configs(
        ["greedy", "self-consistency", "adaptive", "deepconf"], [1, 4], TTSConfig()
    )
    rows = evaluate(
        engine, PROBLEMS, configs, nested=False, progress=False, instruction="", max_num_seqs=4
    )
    assert [r["label"] for r in rows] == [
        "greedy",
        "self-consistency@1",
        "self-consistency@4",
        "adaptive@4",
        "deepconf@4",
    ]
    assert all(r["wall_s"] is not None and r["problems"] == 3 for r in rows)
    assert engine.blocks.num_used_blocks == 0 and not engine.requests
    paths = write_results(rows, {"title": "fake"}, tmp_path / "out" / "sweep")
    assert sorted(p.name for p in paths) == [
        "sweep.json",
        "sweep.md",
        "sweep_accuracy_vs_n.png",
        "sweep_accuracy_vs_tokens.png",
        "sweep_wall_time.png",
    ]
    saved = json.loads(paths[0].read_text())
    assert saved["meta"]["title"] == "fake" and len(saved["rows"]) == 5
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths[2:])
    assert "| greedy |" in paths[1].read_text()
    table = format_table(rows)
    assert "| greedy |" in table and "adaptive@4" in table
    assert all(r["cut_off"] == 0 and r["unanswered"] == 0 for r in rows)
    assert cut_off_warning(rows, 512) is None


def test_a_cap_that_cuts_samples_off_is_reported():
    # "hmm so The answer is 42 ." and EOS: cut off after 3 tokens, before any answer
    tight = sweep_configs(["self-consistency"], [2], TTSConfig(max_tokens=3))
    rows = evaluate(FakeEngine(SCRIPTS), PROBLEMS, tight, progress=False, instruction="")
    assert rows[0]["cut_off"] == rows[0]["unanswered"] == 1.0 and rows[0]["correct"] == 0
    assert cut_off_warning(rows, 3) == (
        "warning: max_tokens 3 cut off 100% of the samples of self-consistency@2;"
        " their answers are lost (raise --max-tokens)"
    )


def test_tasks(tmp_path):
    a = load_problems("basic_arithmetic", size=5, seed=3)
    assert a == load_problems("basic_arithmetic", size=5, seed=3)  # offline, fixed seed
    assert a != load_problems("basic_arithmetic", size=5, seed=4)
    assert all(p.question.startswith("Calculate") for p in a)
    big = load_problems("basic_arithmetic", 5, 0, parse_options(["min_digits=3", "max_digits=3"]))
    digits = [len(t) for p in big for t in re.findall(r"\d+", p.question)]
    assert max(digits) == 3 and max(len(t) for p in a for t in re.findall(r"\d+", p.question)) <= 2
    assert len(load_problems("gsm_symbolic", size=2, seed=0)) == 2
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "2+2?", "answer": 4}\n\n{"question": "3+3?", "answer": "6"}\n')
    assert load_problems(data=data, size=0) == [Problem("2+2?", "4"), Problem("3+3?", "6")]
    assert all_numeric(a) and all_numeric(load_problems(data=data, size=0))
    assert not all_numeric([Problem("2+2?", "4"), Problem("Capital of France?", "Paris")])
    assert parse_options(["a=3", "b=x", "c=0.5"]) == {"a": 3, "b": "x", "c": 0.5}


def test_task_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "2+2?"}\n')
    with pytest.raises(ThriftyError, match="bad.jsonl:1: each line must be"):
        load_problems(data=bad)
    with pytest.raises(ThriftyError, match="no such data file"):
        load_problems(data=tmp_path / "missing.jsonl")
    with pytest.raises(ThriftyError, match="unknown task"):
        load_problems("chess")
    with pytest.raises(ThriftyError, match="not KEY=VALUE"):
        parse_options(["max_terms"])
    with pytest.raises(ThriftyError, match="bad options for basic_arithmetic"):
        load_problems("basic_arithmetic", 2, 0, {"colour": "red"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--strategies", "greedy,magic"], "unknown strategy"),
        (["eval", "--ns", "1,x"], "--ns must be"),
        (["eval", "--data", "/nonexistent.jsonl"], "no such data file"),
        (["eval", "--ns", "1,4", "--strategies", "deepconf", "--temperature", "-1"], "temperature"),
    ],
)
def test_eval_cli_input_errors(argv, message, capsys):
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def _seeds(config: TTSConfig) -> list[int | None]:
    """The sampling seed of every request a sweep of `config` sends."""
    engine, seeds = FakeEngine(SCRIPTS), []
    add = engine.add_request

    def recording(prompt, params, *args, **kwargs):
        seeds.append(params.seed)
        return add(prompt, params, *args, **kwargs)

    engine.add_request = recording
    evaluate(engine, PROBLEMS, sweep_configs(["self-consistency"], [2], config), progress=False)
    return seeds


def test_every_problem_samples_from_its_own_seed():
    seeds = _seeds(TTSConfig(seed=0))
    assert len(set(seeds)) == len(PROBLEMS)  # sample k of each problem draws its own stream
    assert all(0 <= s < 2**40 for s in seeds)  # the engine's generators take seed * 1_000_003 + k
    assert _seeds(TTSConfig(seed=0)) == seeds  # the same seed gives the same streams
    assert set(_seeds(TTSConfig(seed=1))).isdisjoint(seeds)
    assert _seeds(TTSConfig()) == [None] * len(PROBLEMS)
