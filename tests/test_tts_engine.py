"""Test-time scaling on the real engine (SmolLM2-135M-Instruct, fp32): n samples share one
prefill, the thinking budget's injected tokens land at the right positions and extend the same
KV cache, abort_sample frees one sample's blocks, and the CLI surfaces."""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from thrifty import SamplingParams
from thrifty.cli import main
from thrifty.tts import ThinkingBudget, run_strategy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(smollm2_fp32):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_engine: one thread is faster on a small shared CPU
    yield smollm2_fp32
    torch.set_num_threads(threads)
    engine = smollm2_fp32.engine
    assert not engine.requests and not engine.has_unfinished()
    assert engine.blocks.num_used_blocks == 0


def generate(engine, prompt, params, hook=None):
    rid = engine.add_request(prompt, params, token_hook=hook)
    while engine.has_unfinished():
        engine.step()
    return engine.pop_finished(rid)


def test_sixteen_samples_prefill_the_prompt_once(llm):
    engine = llm.engine
    # The fixture's engine is shared with other test modules, whose prompts may have left the
    # template's default system prompt in the prefix cache: a system message of its own keeps
    # every block of this prompt uncached, so the count below is exact whatever ran before.
    prompt = llm._chat_ids(
        [
            {"role": "system", "content": f"Solve it. Session {uuid.uuid4().hex}."},
            {
                "role": "user",
                "content": "A farmer has 17 sheep; all but 9 run away. How many "
                "are left? Think it through, then end with: The answer is N.",
            },
        ]
    )
    before = engine.runner.num_prefill_tokens
    result = run_strategy(
        engine, prompt, {"strategy": "self-consistency", "n": 16, "max_tokens": 4, "seed": 0}
    )
    # A sample may end at <|im_end|> (the uuid above changes the prompt on every run, and CPUs
    # round differently): each runs to max_tokens or stops at the EOS token (kept in its ids).
    samples = result["samples"]
    assert len(samples) == result["num_samples"] == 16
    assert all(
        s["tokens"] == 4
        and s["finish_reason"] == "length"
        or 1 <= s["tokens"] <= 4
        and s["finish_reason"] == "stop"
        for s in samples
    )
    assert result["tokens"] == sum(s["tokens"] for s in samples)
    bs = engine.config.block_size
    tail = len(prompt) - (len(prompt) - 1) // bs * bs  # the partial last block: per sample
    assert engine.runner.num_prefill_tokens - before == len(prompt) + 15 * tail
    assert len(prompt) > 3 * bs  # so sharing saved most of the prompt 15 times over


def test_thinking_budget_injects_at_exact_positions_on_the_same_kv(llm):
    engine, tok = llm.engine, llm.tokenizer
    prompt = llm._chat_ids([{"role": "user", "content": "Describe the sea in a few sentences."}])
    greedy = SamplingParams(max_tokens=40, temperature=0)
    base = generate(engine, prompt, greedy).seqs[0].output_token_ids
    dot = tok.encode(".", add_special_tokens=False)[0]
    first_dot = base.index(dot)
    assert first_dot >= 4
    # The chat template opens the assistant turn with <|im_start|>: let that open the "thinking"
    # block and "." close it, so SmolLM2 (which has no <think>) exercises the same machinery.
    markers = {"start": "<|im_start|>", "end": ".", "wait": " Wait", "answer_cue": " So"}

    # Maximum: after k reasoning tokens the end marker and the cue are appended.
    k = first_dot - 2
    cap = ThinkingBudget(tok, k, **markers)
    decode_before = engine.runner.num_decode_tokens
    seq = generate(engine, prompt, greedy, cap).seqs[0]
    out = seq.output_token_ids
    assert out[:k] == base[:k] and cap.thinking_tokens(seq) == k
    assert out[k : k + len(cap.close_ids)] == cap.close_ids == [dot, *tok.encode(" So")]
    # Every output token but the last was computed exactly once, injected ones included.
    assert engine.runner.num_decode_tokens - decode_before == len(out) - 1
    # ...and computed right: the same prefix prefilled from scratch continues the same way.
    forced = k + len(cap.close_ids)
    fresh = generate(engine, prompt + out[:forced], SamplingParams(max_tokens=6, temperature=0))
    assert out[forced : forced + 6] == fresh.seqs[0].output_token_ids

    # Minimum: the model's early "." is dropped and " Wait" takes its place.
    floor = ThinkingBudget(tok, None, first_dot + 4, **markers)
    out = generate(engine, prompt, greedy, floor).seqs[0].output_token_ids
    assert out[:first_dot] == base[:first_dot]
    assert out[first_dot : first_dot + len(floor.wait_ids)] == floor.wait_ids
    assert dot not in out[: first_dot + 4]


def test_abort_sample_frees_its_blocks_and_the_siblings_go_on(llm):
    engine = llm.engine
    prompt = llm._chat_ids([{"role": "user", "content": "Name three rivers in Europe."}])
    rid = engine.add_request(prompt, SamplingParams(n=3, max_tokens=12, seed=5))
    request = engine.requests[rid]
    while min(s.num_output_tokens for s in request.seqs) < 3:
        engine.step()
    used = engine.blocks.num_used_blocks
    engine.abort_sample(rid, 1)
    assert engine.blocks.num_used_blocks < used and not request.seqs[1].block_table
    while engine.has_unfinished():
        engine.step()
    done = engine.pop_finished(rid)
    assert [s.finish_reason for s in done.seqs] == ["length", "abort", "length"]
    assert done.seqs[1].num_output_tokens < 12


def test_run_with_a_strategy_prints_the_vote(capsys):
    argv = [
        "run",
        "smollm2-135m-instruct",
        "What is 2 + 3?",
        "--strategy",
        "self-consistency",
        "--n",
        "3",
        "--max-tokens",
        "6",
        "--seed",
        "0",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "[self-consistency] answer:" in err and "samples: 3" in err


def test_eval_end_to_end_on_a_jsonl_file(tmp_path, capsys):
    data = tmp_path / "sums.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"What is {a} + 1?", "answer": a + 1}) + "\n" for a in (2, 5)
        )
    )
    out = tmp_path / "res" / "sums"
    argv = [
        "eval",
        "smollm2-135m-instruct",
        "--data",
        str(data),
        "--ns",
        "1,2",
        "--strategies",
        "greedy,self-consistency,adaptive",
        "--max-tokens",
        "6",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    table = captured.out
    assert "| greedy |" in table and "self-consistency@2" in table
    assert "warning: max_tokens 6 cut off" in captured.err  # 6 tokens end no working
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["label"] for r in saved["rows"]] == [
        "greedy",
        "self-consistency@1",
        "self-consistency@2",
        "adaptive@2",
    ]
    assert saved["meta"]["problems"] == 2
    assert saved["meta"]["config"]["numeric"]  # every gold answer is a number
    assert (out.parent / "sums_accuracy_vs_tokens.png").stat().st_size > 1000
