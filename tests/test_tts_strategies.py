"""Every test-time scaling strategy against a scripted engine: the real LLMEngine bookkeeping
(sequences, scheduler, paged blocks, prefix cache, token hooks, abort_sample) with the model
replaced by a script that says which words each sample of each prompt produces, and how
confident it is about each one."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from thrifty.config import EngineConfig
from thrifty.engine.block_manager import BlockManager
from thrifty.engine.llm_engine import LLMEngine
from thrifty.engine.scheduler import Scheduler
from thrifty.engine.sequence import TokenLogprob
from thrifty.errors import ThriftyError
from thrifty.tokenizer import Tokenizer
from thrifty.tts import Job, JobSet, ThinkingBudget, TTSConfig, run_jobs, run_strategy
from thrifty.tts.voting import settled, tally

WORDS = [
    "<unk>",
    "<eos>",
    "Q1",
    "Q2",
    "Q3",
    "The",
    "answer",
    "is",
    "a",
    "b",
    "c",
    "d",
    "e",
    "f",
    "g",
    "h",
    "x",
    "y",
    "z",
    "w",
    "v",
    "u",
    "hmm",
    "so",
    "Wait",
    "7",
    "42",
    "9",
    ".",
    "+",
    "=",
]
EOS = 1


def make_tokenizer() -> Tokenizer:
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<eos>"])
    tok.add_tokens(["<think>", "</think>"])  # ids 31, 32: plain (shown) added tokens
    # the chat template passes the question through, so prompts keep their first word
    config = {"eos_token": "<eos>", "chat_template": "{{ messages[-1]['content'] }}"}
    return Tokenizer(tok, config, (EOS,))


TOKENIZER = make_tokenizer()
ID = {w: TOKENIZER.encode(w, add_special_tokens=False)[0] for w in [*WORDS[2:], "</think>"]}


def trace(text: str, conf: float | list[float] = 1.0) -> list[tuple[int, float]]:
    """A scripted sample: its tokens (ending with EOS) and the confidence of each."""
    ids = [*TOKENIZER.encode(text, add_special_tokens=False), EOS]
    confs = conf if isinstance(conf, list) else [conf] * len(ids)
    confs = (confs + [confs[-1]] * len(ids))[: len(ids)]
    return list(zip(ids, confs, strict=True))


class ScriptedRunner:
    """Stands in for ModelRunner: the k-th sample started for a prompt follows script[k]."""

    def __init__(self, scripts: dict[str, list[list[tuple[int, float]]]]):
        self.scripts = scripts
        self.sample_of: dict[int, tuple[str, int]] = {}  # seq_id -> (prompt, k)
        self.started: dict[str, itertools.count] = {}
        self.sampled: dict[int, int] = {}  # seq_id -> tokens sampled so far
        self.num_prefill_tokens = 0

    def step(self, batch):
        out_seqs, tokens, logprobs = [], [], []
        for seq, n in batch:
            start = seq.num_computed_tokens
            if start < seq.num_prompt_tokens:
                self.num_prefill_tokens += min(n, seq.num_prompt_tokens - start)
            if start + n < seq.num_tokens:
                continue
            if seq.seq_id not in self.sample_of:
                prompt = TOKENIZER.decode(seq.token_ids[: seq.num_prompt_tokens]).split()[0]
                counter = self.started.setdefault(prompt, itertools.count())
                self.sample_of[seq.seq_id] = (prompt, next(counter))
            prompt, k = self.sample_of[seq.seq_id]
            script = self.scripts[prompt][k % len(self.scripts[prompt])]
            i = self.sampled.get(seq.seq_id, 0)
            self.sampled[seq.seq_id] = i + 1
            token, conf = script[min(i, len(script) - 1)]
            out_seqs.append(seq)
            tokens.append(token)
            k_top = seq.params.logprobs
            logprobs.append(
                None
                if k_top is None
                # every top-k logprob -conf: the token confidence is exactly conf
                else TokenLogprob(token, -conf, [(token, -conf)] * k_top)
            )
        return out_seqs, tokens, logprobs


class FakeEngine(LLMEngine):
    def __init__(self, scripts, *, num_blocks: int = 256, block_size: int = 4):
        self.tokenizer = TOKENIZER
        self.model_config = SimpleNamespace(vocab_size=64)
        self.max_model_len = 1024
        self.config = EngineConfig(
            block_size=block_size, max_num_seqs=64, max_num_batched_tokens=256
        )
        self.blocks = BlockManager(num_blocks, block_size, True)
        self.scheduler = Scheduler(self.config, self.blocks)
        self.runner = ScriptedRunner(scripts)
        self.spec = None  # no speculative decoding
        self.requests = {}
        self._ids = itertools.count()


def answers(*values: str) -> list[list[tuple[int, float]]]:
    return [trace(f"hmm so The answer is {v} .") for v in values]


def run(scripts, prompt="Q1 x", **config):
    engine = FakeEngine(scripts)
    result = run_strategy(engine, prompt, config)
    assert not engine.requests and not engine.has_unfinished()
    assert engine.blocks.num_used_blocks == 0
    return result, engine


def test_greedy_takes_one_sample():
    result, _ = run({"Q1": answers("42", "7")}, strategy="greedy")
    assert result["answer"] == "42" and result["num_samples"] == 1
    assert result["tokens"] == len(answers("42")[0])


def test_self_consistency_majority_votes_and_tokens():
    result, _ = run({"Q1": answers("7", "42", "42", "9", "42")}, strategy="self-consistency", n=5)
    assert result["answer"] == "42"
    assert result["votes"] == {"42": 3.0, "7": 1.0, "9": 1.0}
    assert result["num_samples"] == 5 and result["tokens"] == 5 * len(answers("42")[0])
    assert "The answer is 42" in result["text"]


def test_numeric_votes_only_numbers():
    # "The answer is x": the placeholder of the prompt's "end with: The answer is N", echoed
    script = {"Q1": answers("x", "x", "x", "42", "42")}
    loose, _ = run(script, strategy="self-consistency", n=5)
    assert loose["answer"] == "x" and loose["votes"] == {"x": 3.0, "42": 2.0}
    strict, _ = run(script, strategy="self-consistency", n=5, numeric=True)
    assert strict["answer"] == "42" and strict["votes"] == {"42": 2.0}
    assert [s["answer"] for s in strict["samples"]] == [None, None, None, "42", "42"]


def test_self_consistency_tie_goes_to_the_answer_seen_first():
    result, _ = run({"Q1": answers("7", "42", "42", "7")}, strategy="self-consistency", n=4)
    assert result["votes"] == {"7": 2.0, "42": 2.0} and result["answer"] == "7"
    result, _ = run({"Q1": answers("42", "7", "7", "42")}, strategy="self-consistency", n=4)
    assert result["answer"] == "42"


def test_a_sample_cut_off_at_max_tokens_votes_only_with_a_stated_answer():
    scripts = {
        "Q1": [
            trace("hmm so 9 + 9 ."),
            trace("The answer is 7 . hmm 42 42 42"),
            trace("hmm 9 + 9 + 9"),
        ]
    }
    result, _ = run(scripts, strategy="self-consistency", n=3, max_tokens=4)
    assert [s["finish_reason"] for s in result["samples"]] == ["length"] * 3
    # "hmm so 9 +" and "hmm 9 + 9" (cut) state no answer; "The answer is 7" did
    assert [s["answer"] for s in result["samples"]] == [None, "7", None]
    assert result["answer"] == "7"


def test_samples_without_an_answer_abstain():
    scripts = {"Q1": [trace("hmm so ."), *answers("9"), trace("hmm .")]}
    result, _ = run(scripts, strategy="self-consistency", n=3)
    assert result["answer"] == "9" and result["votes"] == {"9": 1.0}
    result, _ = run({"Q1": [trace("hmm .")]}, strategy="self-consistency", n=2)
    assert result["answer"] is None and result["votes"] == {}


def test_n_samples_share_the_prompt_blocks():
    prompt = "Q1 " + "a " * 15  # 16 tokens: three full blocks of 4 shared, the last recomputed
    result, engine = run({"Q1": answers("42")}, prompt=prompt, strategy="self-consistency", n=8)
    assert result["num_samples"] == 8
    assert engine.runner.num_prefill_tokens == 16 + 7 * 4
    assert engine.blocks.prefix_hits == 7 * 12


@pytest.mark.parametrize(
    ("rule", "values", "wave", "confidence", "expected"),
    [
        ("beta", ["42"] * 16, 2, 0.95, 4),  # Beta(5, 1): P = 31/32 > 0.95 after four agreeing
        ("beta", ["42"] * 16, 1, 0.95, 4),  # three agreeing give only 15/16: one at a time, 4
        ("beta", ["42", "42", "7", "42", "42", "42", "42", "42"], 2, 0.95, 8),  # 7:1 gives 0.98
        ("beta", ["42", "7"] * 8, 2, 0.95, 16),  # never decided: all n samples
        ("beta", ["42"] * 16, 4, 0.99, 8),  # 6 agreeing: 0.992; waves of 4 reach it at 8
        # three agreeing with thirteen to go: the urn keeps 42 ahead with P = 0.96
        ("predictive", ["42"] * 16, 1, 0.95, 3),
        ("predictive", ["42"] * 16, 2, 0.95, 4),  # two agreeing: only 0.89
        ("predictive", ["42", "7"] * 8, 2, 0.95, 16),
        # 6:2 after eight with eight to go: 0.97 (Beta: 0.96 for 6:1 first, at 12)
        ("predictive", ["42", "42", "7", "42", "7", "42", "42", "42", *["42"] * 8], 2, 0.95, 8),
    ],
)
def test_adaptive_stops_when_the_vote_is_decided(rule, values, wave, confidence, expected):
    result, _ = run(
        {"Q1": answers(*values)},
        strategy="adaptive",
        n=16,
        wave=wave,
        confidence=confidence,
        stopping_rule=rule,
    )
    assert result["num_samples"] == expected
    assert result["answer"] == "42"


def test_adaptive_stops_once_the_remaining_samples_cannot_change_the_winner():
    # 5:1 after six: Beta gives 0.94 < 0.99, but two more samples cannot overturn a lead of 4.
    beta = dict(strategy="adaptive", n=8, wave=2, confidence=0.99, stopping_rule="beta")
    values = ["42", "7", "42", "42", "42", "42", "42", "42"]
    result, _ = run({"Q1": answers(*values)}, **beta)
    assert (result["num_samples"], result["answer"]) == (6, "42")
    # 3:1 after four with four to go could still end 3:5: keep drawing.
    values = ["42", "7", "42", "42", "7", "7", "7", "7"]
    result, _ = run({"Q1": answers(*values)}, **beta)
    assert (result["num_samples"], result["answer"]) == (8, "7")


def test_settled_counts_ties_for_the_earlier_answer():
    votes = tally(["7", "42", "42", "42"])  # 42 leads 3:1, 7 came first
    assert not settled(votes, 2)  # 3:3 would go to 7
    assert settled(tally(["42", "7", "42", "42"]), 2)  # 3:3 would go to 42
    assert settled(tally(["42", "42"]), 2) and not settled(tally(["42"]), 2)
    assert settled([], 0) and not settled([], 1)


def test_adaptive_dirichlet_rule():
    result, _ = run(
        {"Q1": answers(*["42"] * 16)}, strategy="adaptive", n=16, wave=2, stopping_rule="dirichlet"
    )
    assert result["num_samples"] == 4  # Dirichlet(5, 1): P(p1 > p2) = 31/32, by Monte Carlo
    result, _ = run(
        {"Q1": answers(*["42", "7", "9"] * 6)}, strategy="adaptive", n=12, stopping_rule="dirichlet"
    )
    assert result["num_samples"] == 12


def test_adaptive_predictive_rule_stops_once_the_budget_would_not_change_the_answer():
    # 42 leads 6:2 after eight with eight to go. Beta and Dirichlet ask whether 42 leads in the
    # limit and draw on to twelve; the predictive rule asks whether the remaining eight would
    # overturn it.
    values = ["42", "7", "42", "42", "9", "42", "42", "7", *["42", "42", "42", "7"] * 2]
    used = {}
    for rule in ("beta", "dirichlet", "predictive"):
        result, _ = run({"Q1": answers(*values)}, strategy="adaptive", n=16, stopping_rule=rule)
        used[rule] = result["num_samples"]
        assert result["answer"] == "42"
    assert used == {"beta": 12, "dirichlet": 12, "predictive": 8}
    # votes this spread never convince it before the budget is spent
    spread = answers(*["42", "7", "9"] * 6)
    result, _ = run({"Q1": spread}, strategy="adaptive", n=12, stopping_rule="predictive")
    assert result["num_samples"] == 12


def test_deepconf_weighted_vote_without_early_stop():
    # Three unsure samples say 7, two sure ones say 42: confidence weights make 42 win.
    scripts = {
        "Q1": [
            *[trace("hmm so The answer is 7 .", 1.0)] * 3,
            *[trace("hmm so The answer is 42 .", 3.0)] * 2,
        ]
    }
    result, _ = run(scripts, strategy="deepconf", n=5, early_stop=False, keep=1.0, window=2)
    assert result["answer"] == "42"
    assert result["votes"] == {"42": pytest.approx(6.0), "7": pytest.approx(3.0)}
    # keep=0.4: only the two most confident traces vote at all
    result, _ = run(scripts, strategy="deepconf", n=5, early_stop=False, keep=0.4, window=2)
    assert result["votes"] == {"42": pytest.approx(6.0)}


def test_deepconf_stops_unsure_traces_early_and_frees_their_blocks():
    sure = trace("hmm so The answer is 42 .", 3.0)
    # An unsure trace: confident for 3 tokens, then rambles at confidence 0.5 for 40 tokens.
    unsure = trace("hmm so a " + "b " * 40 + "The answer is 7 .", [3.0, 3.0, 3.0, *[0.5] * 50])
    scripts = {"Q1": [sure, sure, sure, sure, unsure, sure, unsure, unsure]}
    engine = FakeEngine(scripts)
    freed = []
    abort_sample = engine.abort_sample

    def watch(request_id, index):
        seq = engine.requests[request_id].seqs[index]
        used = engine.blocks.num_used_blocks
        assert seq.block_table
        abort_sample(request_id, index)
        assert not seq.block_table  # given back at once, not when the request ends
        freed.append((seq.num_output_tokens, used - engine.blocks.num_used_blocks))

    engine.abort_sample = watch
    # consensus=None: no stop on agreement (four sure warm-up traces would already agree)
    config = dict(
        strategy="deepconf", n=8, warmup=4, window=4, consensus=None, deepconf_stop="consensus"
    )
    result = run_strategy(engine, "Q1 x", config)
    assert result["threshold"] == pytest.approx(3.0)
    assert result["num_stopped_early"] == 3 and result["num_samples"] == 8
    # Stopped as soon as a full window of 4 dropped below 3.0: at the 4th token.
    assert [tokens for tokens, _ in freed] == [4, 4, 4]
    assert all(blocks >= 1 for _, blocks in freed)
    assert result["answer"] == "42" and result["votes"] == {"42": pytest.approx(15.0)}
    full = 5 * len(sure) + 3 * len(unsure)
    assert result["tokens"] == 5 * len(sure) + 3 * 4 < full
    assert engine.blocks.num_used_blocks == 0 and not engine.requests


@pytest.mark.parametrize(
    ("consensus", "samples"),
    [(0.95, 8), (0.8, 6), (0.7, 4)],  # weighted shares of 42: 9/12, 15/18, 21/24 after 4, 6, 8
)
def test_deepconf_stops_drawing_traces_once_the_weighted_vote_agrees(consensus, samples):
    sure, other = trace("hmm so The answer is 42 .", 3.0), trace("hmm so The answer is 7 .", 3.0)
    scripts = {"Q1": [sure, other, sure, sure, *[sure] * 4]}
    config = dict(strategy="deepconf", n=8, warmup=4, wave=2, window=2, consensus=consensus)
    result, _ = run(scripts, **config, deepconf_stop="consensus")
    assert (result["num_samples"], result["answer"]) == (samples, "42")
    assert result["tokens"] == samples * len(sure)


def test_deepconf_adaptive_stop_counts_stopped_traces_as_drawn_without_an_answer():
    sure, other = trace("hmm so The answer is 42 .", 3.0), trace("hmm so The answer is 7 .", 3.0)
    unsure = trace("hmm so a " + "b " * 20 + "The answer is 7 .", [3.0, 3.0, 3.0, *[0.5] * 30])
    # Warm-up 42, 7, 42, 42; then two unsure 7s, stopped early. Their dissent is gone from the
    # finished traces (42 has 9/12 of the weighted vote, as before they were drawn), but they
    # were drawn: 3:1 with two abstentions and ten to go is not sure (P = 0.94 < 0.95), so
    # DeepConf draws on, and stops at eight once 42 leads 5:1 (P = 0.99).
    scripts = {"Q1": [sure, other, sure, sure, unsure, unsure, *[sure] * 10]}
    config = dict(strategy="deepconf", n=16, warmup=4, wave=2, window=2, confidence=0.95)
    result, _ = run(scripts, **config)
    assert (result["num_samples"], result["num_stopped_early"]) == (8, 2)
    assert result["answer"] == "42"
    # the paper's consensus share at 0.75 would have stopped after the warm-up
    result, _ = run(scripts, **config, deepconf_stop="consensus", consensus=0.75)
    assert result["num_samples"] == 4


def test_best_of_n_by_mean_logprob_and_by_scorer():
    scripts = {
        "Q1": [
            trace("hmm so The answer is 7 .", 2.0),
            trace("hmm so The answer is 42 .", 0.5),
            trace("hmm so The answer is 9 .", 1.0),
        ]
    }
    result, _ = run(scripts, strategy="best-of-n", n=3)
    assert result["answer"] == "42"  # mean logprob -0.5 beats -1 and -2
    sure = {"Q1": [scripts["Q1"][0], trace("hmm so The answer is 9 .", 0.0)]}
    assert run(sure, strategy="best-of-n", n=2)[0]["answer"] == "9"  # logprob 0 is the best
    # A Python scorer comes in a TTSConfig; JSON (the server's field) cannot carry one.
    with pytest.raises(ThriftyError, match="unknown test_time_scaling field"):
        run(scripts, strategy="best-of-n", scorer=len)
    engine = FakeEngine(scripts)
    seen = []
    cfg = TTSConfig(strategy="best-of-n", n=3, scorer=lambda p, t: seen.append(p) or "9" in t)
    assert run_strategy(engine, "Q1 x", cfg)["answer"] == "9"
    assert seen == ["Q1 x"] * 3


def test_many_jobs_share_one_engine():
    scripts = {"Q1": answers("42"), "Q2": answers("7", "9", "9"), "Q3": answers("9")}
    engine = FakeEngine(scripts)
    cfg = TTSConfig(strategy="self-consistency", n=3)
    jobs = [Job(engine, f"{q} x", cfg) for q in ("Q1", "Q2", "Q3")]
    run_jobs(engine, jobs, max_active=2)
    assert [j.result()["answer"] for j in jobs] == ["42", "9", "9"]
    assert engine.blocks.num_used_blocks == 0 and not engine.requests


def test_config_errors_are_clear():
    with pytest.raises(ThriftyError, match="strategy must be one of"):
        TTSConfig.from_dict({"strategy": "magic"})
    with pytest.raises(ThriftyError, match="unknown test_time_scaling field"):
        TTSConfig.from_dict({"nn": 3})
    with pytest.raises(ThriftyError, match="warmup"):
        TTSConfig(strategy="deepconf", n=4, warmup=4)
    with pytest.raises(ThriftyError, match="confidence"):
        TTSConfig(confidence=1.0)


# -- thinking budget -------------------------------------------------------------------------


def think(script: str, prompt: str = "Q1 <think>", **budget) -> tuple[list[int], str]:
    engine = FakeEngine({"Q1": [trace(script)]})
    hook = ThinkingBudget(TOKENIZER, **budget, wait="Wait", answer_cue="The answer is")
    rid = engine.add_request(prompt, engine_params(), token_hook=hook)
    while engine.has_unfinished():
        engine.step()
    seq = engine.pop_finished(rid).seqs[0]
    out = seq.output_token_ids
    return (out[:-1] if out[-1] == EOS else out), seq.output_text


def engine_params():
    from thrifty.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=64, temperature=0)


def ids(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False)


def test_thinking_cap_closes_the_block_at_exactly_max_tokens():
    out, text = think("a b c d e f g h </think> 9 .", max_tokens=5)
    assert out[:5] == ids("a b c d e")
    assert out[5:9] == ids("</think> The answer is")  # injected after the 5th reasoning token
    # the model goes on from where it is: sampled token 6 of its script
    assert out[9] == ID["f"]
    assert text.strip().startswith("a b c d e </think> The answer is f")


def test_thinking_cap_zero_and_unlimited():
    out, _ = think("a b </think> 9 .", max_tokens=0, prompt="Q1 x")
    assert out == ids("a b </think> 9 .")  # no <think> opened: the hook stands aside
    out, _ = think("<think> a b </think> 9 .", max_tokens=0, prompt="Q1 x")
    assert out[:5] == ids("<think> </think> The answer is")
    out, _ = think("a b </think> 9 .", max_tokens=None)
    assert out == ids("a b </think> 9 .")


def test_thinking_minimum_replaces_the_early_end_with_wait():
    out, _ = think("a b </think> x y z w </think> 42 .", min_tokens=5)
    # the first </think> came after 2 tokens: dropped, "Wait" (the 3rd token) in its place
    assert out[:7] == ids("a b Wait x y z w")
    assert out[7] == ID["</think>"]  # after 6 reasoning tokens the end is allowed
    assert out[8:] == ids("42 .")
    # an EOS inside the block is suppressed the same way
    out, _ = think("a <eos> b </think> 9 .", min_tokens=3)
    assert out == ids("a Wait b </think> 9 .")


def test_thinking_minimum_yields_to_the_maximum():
    # At 3 of max 3 tokens there is no room for "Wait": the block closes at the cap instead.
    out, _ = think("a b c d </think> 9", min_tokens=3, max_tokens=3)
    assert out[:3] == ids("a b c") and out[3:7] == ids("</think> The answer is")


def test_thinking_budget_inside_a_strategy_and_errors():
    scripts = {"Q1": [trace("a b c d e f g h i 42 .")]}
    engine = FakeEngine(scripts)
    result = run_strategy(engine, "Q1 <think>", {"strategy": "greedy", "max_thinking_tokens": 3})
    assert result["text"].strip().startswith("a b c </think> The answer is d")
    with pytest.raises(ThriftyError, match="one token"):
        ThinkingBudget(TOKENIZER, 5, start="so Wait")
    with pytest.raises(ThriftyError, match="min_thinking_tokens"):
        ThinkingBudget(TOKENIZER, 5, 6)


def test_job_set_beside_a_loop_that_steps_the_engine():
    # The server's engine thread steps the engine for plain requests and tts jobs alike.
    scripts = {"Q1": answers("42", "42", "7"), "Q2": answers("9"), "Q3": [trace("a " * 60)]}
    engine = FakeEngine(scripts)
    jobs = JobSet(engine)
    plain = engine.add_request("Q2 x", engine_params())
    sc = Job(engine, "Q1 x", TTSConfig(strategy="self-consistency", n=3), job_id="chat-1-tts")
    doomed = Job(engine, "Q3 x", TTSConfig(strategy="self-consistency", n=2), job_id="chat-2-tts")
    jobs.start(sc)
    jobs.start(doomed)
    assert not jobs.owns(plain) and jobs.owns("chat-1-tts-w0")
    finished, steps = [], 0
    while engine.has_unfinished():
        finished += jobs.observe(engine.step())
        steps += 1
        if steps == 3:
            used = engine.blocks.num_used_blocks
            jobs.abort("chat-2-tts")  # the client went away
            assert engine.blocks.num_used_blocks < used
    assert finished == [sc] and sc.result()["answer"] == "42"
    assert engine.pop_finished(plain).seqs[0].finish_reason == "stop"
    assert not jobs.active and not engine.requests and engine.blocks.num_used_blocks == 0
