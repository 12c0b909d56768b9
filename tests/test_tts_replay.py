"""Strategies replayed on recorded samples (thrifty.tts.replay) decide exactly as the online
jobs do: the same sweep on the scripted engine of test_tts_strategies, once online and once
nested (one self-consistency run, the rest replayed on its samples), gives the same rows."""

from __future__ import annotations

import json

import pytest
from test_tts_strategies import FakeEngine, trace

from thrifty.errors import ThriftyError
from thrifty.tts import TTSConfig
from thrifty.tts.eval import evaluate, read_samples, sweep_configs, write_results
from thrifty.tts.replay import Sample, adaptive, deepconf, stop_point
from thrifty.tts.tasks import Problem

SURE = trace("hmm so The answer is 42 .", 3.0)
# Confident for 3 tokens, then rambling at 0.5: stopped once a full window drops that low.
UNSURE = trace("hmm so a " + "b " * 20 + "The answer is 7 .", [3.0, 3.0, 3.0, *[0.5] * 30])
MIXED = trace("hmm so The answer is 9 .", [2.0, 1.0, 2.5, 1.5, 2.0, 2.2, 1.8])
SCRIPTS = {
    "Q1": [SURE, SURE, SURE, UNSURE, UNSURE, SURE, UNSURE, MIXED],
    "Q2": [MIXED, UNSURE, SURE, MIXED, MIXED, UNSURE, SURE, MIXED],
    "Q3": [SURE] * 8,
}
PROBLEMS = [Problem("Q1 x", "42"), Problem("Q2 x", "9"), Problem("Q3 x", "42")]
COMPARED = ("accuracy", "tokens", "samples_per_problem", "stopped_early")


@pytest.mark.parametrize(
    ("window", "consensus", "rule", "stop"),
    [
        (2, 0.95, "beta", "consensus"),
        (4, 0.95, "beta", "adaptive"),
        (4, 0.6, "dirichlet", "consensus"),
        (2, None, "predictive", "consensus"),
        (2, None, "predictive", "adaptive"),
    ],
)
def test_nested_sweep_replays_adaptive_and_deepconf_exactly(window, consensus, rule, stop):
    base = TTSConfig(
        window=window, wave=2, consensus=consensus, stopping_rule=rule, deepconf_stop=stop
    )
    configs = sweep_configs(
        ["self-consistency", "adaptive", "deepconf"], [2, 8], base, [0.8, 0.95], [0.1, 0.5, 0.9]
    )
    labels = [
        "self-consistency@2",
        "self-consistency@8",
        "adaptive@8 c=0.8",
        "adaptive@8",
        "deepconf@8 keep=0.1",
        "deepconf@8 keep=0.5",
        "deepconf@8",
    ]
    run = dict(progress=False, instruction="", max_num_seqs=8)
    # a fresh engine per online run: the script hands out samples in the order they start
    online = [evaluate(FakeEngine(SCRIPTS), PROBLEMS, [c], nested=False, **run)[0] for c in configs]
    nested = evaluate(FakeEngine(SCRIPTS), PROBLEMS, configs, nested=True, **run)
    assert [r["label"] for r in online] == [r["label"] for r in nested] == labels
    for a, b in zip(online, nested, strict=True):
        assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}, a["label"]
        assert [p["answer"] for p in a["per_problem"]] == [p["answer"] for p in b["per_problem"]]
        assert a["wall_s"] is not None
        assert (b["wall_s"] is None) == (b["label"] != "self-consistency@8")
    by = {r["label"]: r for r in nested}
    assert by["deepconf@8 keep=0.1"]["stopped_early"] > by["deepconf@8"]["stopped_early"] > 0
    assert by["adaptive@8 c=0.8"]["samples_per_problem"] < by["adaptive@8"]["samples_per_problem"]
    assert by["deepconf@8"]["derived_from"] == "self-consistency@8"
    # Q3's warm-up agrees: with any stop, DeepConf draws no more traces for it
    q3 = by["deepconf@8"]["per_problem"][2]["samples"]
    assert q3 == (8 if stop == "consensus" and consensus is None else 4)


def test_stop_point():
    # window 2: means of (3, 3), (3, 1), (1, 1) ...; the last token is never checked
    assert stop_point((3.0, 3.0, 1.0, 1.0, 1.0), 2, 2.5) == 3
    assert stop_point((3.0, 3.0, 1.0, 1.0, 1.0), 2, 0.5) is None
    assert stop_point((3.0, 1.0), 2, 2.5) is None  # the only full window ends the trace
    assert stop_point((3.0, 1.0, 1.0), 4, 2.5) is None  # never a full window


def test_replay_without_enough_samples_uses_what_there_is():
    samples = [Sample("42", 5, (1.0,) * 5)] * 3
    assert adaptive(samples, TTSConfig(strategy="adaptive", n=16))["num_samples"] == 3
    result = deepconf(samples, TTSConfig(strategy="deepconf", n=16, warmup=2, consensus=None))
    assert result["answer"] == "42" and result["num_samples"] == 3 and result["tokens"] == 15


def test_eval_cli_rejects_bad_sweep_lists(capsys):
    from thrifty.cli import main

    assert main(["eval", "--confidences", "0.9,high"]) == 1
    assert "--confidences must be comma-separated numbers" in capsys.readouterr().err
    assert main(["eval", "--keeps", "0"]) == 1
    assert "keep must be in (0, 1]" in capsys.readouterr().err


def test_saved_confidences_replay_deepconf_as_the_sweep_did(tmp_path):
    configs = sweep_configs(["self-consistency", "deepconf"], [8], TTSConfig(window=2, wave=2))
    run = dict(progress=False, instruction="", max_num_seqs=8)
    plain = evaluate(FakeEngine(SCRIPTS), PROBLEMS, configs, **run)
    assert all(len(d) == 2 for d in plain[0]["per_problem"][0]["drawn"])
    assert "drawn_confidences" not in plain[0]["per_problem"][0]
    rows = evaluate(FakeEngine(SCRIPTS), PROBLEMS, configs, save_confidences=True, **run)
    paths = write_results(rows, {"title": "fake"}, tmp_path / "sweep")
    assert (tmp_path / "sweep_samples.json.gz") in paths
    # the JSON keeps [answer, tokens]; the confidences sit beside it, compressed
    saved = json.loads((tmp_path / "sweep.json").read_text())["rows"][0]["per_problem"][0]
    assert saved["drawn"] == rows[0]["per_problem"][0]["drawn"]
    assert all(len(d) == 2 for d in saved["drawn"]) and "drawn_confidences" not in saved
    gold, samples, n = read_samples(tmp_path / "sweep.json")
    assert (gold, n) == ([p.answer for p in PROBLEMS], 8)
    for drawn, result in zip(samples, rows[1]["per_problem"], strict=True):
        assert [len(s.token_confidences) for s in drawn] == [s.tokens for s in drawn]
        again = deepconf(drawn, configs[1])
        assert (again["answer"], again["tokens"]) == (result["answer"], result["tokens"])
    # without kept confidences, the answers and lengths still load
    write_results(plain, {"title": "fake"}, tmp_path / "plain")
    assert not (tmp_path / "plain_samples.json.gz").exists()
    _, samples, _ = read_samples(tmp_path / "plain.json")
    assert samples[0][0].token_confidences == () and samples[0][0].tokens > 0
    # a missing or foreign file is one clear error
    (tmp_path / "other.json").write_text("[1, 2]")
    for bad in (tmp_path / "missing.json", tmp_path / "other.json"):
        with pytest.raises(ThriftyError, match="not a `thrifty eval` JSON"):
            read_samples(bad)
