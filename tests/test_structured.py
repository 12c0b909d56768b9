"""Structured output in the engine: grammars (llguidance) masking the real SmolLM2's logits.

Every constrained output is checked against its constraint by an independent checker
(jsonschema, re.fullmatch); the bitmask unpacking is held to a plain-Python reference; a free
request that shares the batch must come out exactly as it does alone.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from llguidance import LLMatcher, LLTokenizer

from thrifty import SamplingParams, ThriftyError
from thrifty.engine.structured import (
    Constraint,
    Guide,
    mask_logits,
    tighten,
    unpack_bitmask,
    unpack_bitmask_reference,
)

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Rome", "Tokyo"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "city"],
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def llm(smollm2_fp32):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield smollm2_fp32
    torch.set_num_threads(threads)
    engine = smollm2_fp32.engine
    assert not engine.requests and engine.blocks.num_used_blocks == 0


def generate(llm, prompts_and_params):
    """All requests in one batch; their outputs (each a list of samples) in order."""
    engine = llm.engine
    rids = [engine.add_request(p, params) for p, params in prompts_and_params]
    while engine.has_unfinished():
        engine.step()
    return [engine.pop_finished(rid).seqs for rid in rids]


def test_constrained_and_free_share_a_batch(llm):
    ids = llm._chat_ids(ASK)
    free = SamplingParams(max_tokens=24, temperature=0)
    schema = Constraint("json_schema", json.dumps(PERSON))
    regex = Constraint("regex", r"(yes|no), because [a-z ]{3,40}\.")
    choice = Constraint("choice", json.dumps(["red", "green", "blue"]))
    lark = Constraint("lark", 'start: "x = " NUM " + " NUM\nNUM: /[0-9]{1,3}/')
    (alone,) = generate(llm, [(ids, free)])
    runs = generate(
        llm,
        [
            (ids, free),
            (ids, SamplingParams(max_tokens=120, temperature=1.0, n=4, seed=7, constraint=schema)),
            (ids, SamplingParams(max_tokens=40, temperature=0, constraint=regex)),
            (ids, SamplingParams(max_tokens=5, temperature=0.8, n=3, seed=1, constraint=choice)),
            (ids, SamplingParams(max_tokens=20, temperature=0, constraint=lark)),
        ],
    )
    together, docs, said, colours, sums = runs
    # The mask touched only its own rows: the free request is token for token the same.
    assert together[0].output_token_ids == alone[0].output_token_ids
    for seq in docs:
        assert seq.finish_reason == "stop", seq.output_text
        jsonschema.validate(json.loads(seq.output_text), PERSON)
    assert re.fullmatch(r"(yes|no), because [a-z ]{3,40}\.", said[0].output_text)
    assert all(s.output_text in ("red", "green", "blue") for s in colours)
    assert re.fullmatch(r"x = [0-9]{1,3} \+ [0-9]{1,3}", sums[0].output_text)
    # A finished grammar ends the sequence at once: no EOS token was needed.
    assert docs[0].output_token_ids[-1] not in llm.tokenizer.eos_token_ids


def test_logit_bias_moves_greedy_choice(llm):
    ids = llm.tokenizer.encode("The capital of France is")
    (base,) = generate(llm, [(ids, SamplingParams(max_tokens=1, temperature=0))])
    first = base[0].output_token_ids[0]
    forced = llm.tokenizer.encode(" banana", add_special_tokens=False)[0]
    (up, down) = generate(
        llm,
        [
            (ids, SamplingParams(max_tokens=1, temperature=0, logit_bias={forced: 100})),
            (ids, SamplingParams(max_tokens=1, temperature=0, logit_bias={first: -100})),
        ],
    )
    assert up[0].output_token_ids == [forced]
    assert down[0].output_token_ids[0] != first


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (Constraint("regex", "[a-"), "invalid regex"),
        (Constraint("json_schema", '{"type": "frobnicate"}'), "invalid json_schema"),
        (Constraint("lark", "start: undefined_rule"), "invalid lark"),
    ],
)
def test_invalid_grammars_are_one_line_errors(llm, constraint, message):
    with pytest.raises(ThriftyError, match=message) as e:
        llm.engine.grammars.check(constraint)
    assert "\n" not in str(e.value)
    ids = llm.tokenizer.encode("Hi")
    with pytest.raises(ThriftyError, match=message):
        llm.engine.add_request(ids, SamplingParams(max_tokens=4, constraint=constraint))
    assert not llm.engine.requests


def test_unpack_bitmask_matches_reference():
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 5), dtype=torch.int32, generator=gen)
    bitmask[1] = -1  # a free row: every token
    vocab = 150  # not a multiple of 32: the last word is cut
    reference = unpack_bitmask_reference(bitmask, vocab)
    for r in range(3):
        for t in range(vocab):
            word = int(bitmask[r, t // 32]) & 0xFFFFFFFF
            assert bool(reference[r, t]) == bool((word >> (t % 32)) & 1)
    allowed = unpack_bitmask(bitmask, vocab)
    assert torch.equal(allowed, reference) and allowed[1].all()
    logits = torch.randn(3, vocab, generator=gen)
    before = logits.clone()
    mask_logits(logits, bitmask)
    assert torch.equal(logits[allowed], before[allowed]) and torch.isinf(logits[~allowed]).all()


def test_thinking_model_reasons_before_the_grammar(llm):
    """With (<think>, </think>) ids, the first token may open reasoning, anything goes inside,
    and the grammar starts after the close."""
    grammars = llm.engine.grammars
    think = tuple(llm.tokenizer.encode(t, add_special_tokens=False)[0] for t in ("hmm", "ok"))
    constraint = Constraint("regex", "[0-9]+")
    digit = llm.tokenizer.encode("7", add_special_tokens=False)[0]
    letter = llm.tokenizer.encode("x", add_special_tokens=False)[0]

    def allowed(guide: Guide) -> torch.Tensor:
        return unpack_bitmask(grammars.fill({0: guide}, 1), grammars.vocab_size)[0]

    g = grammars.guide(constraint, think, in_reasoning=False)
    first = allowed(g)
    assert first[think[0]] and first[digit] and not first[letter]
    g.accept(think[0])
    assert not g.constraining  # reasoning: no mask at all
    g.accept(letter)
    g.accept(think[1])
    assert g.constraining and not allowed(g)[letter] and allowed(g)[digit]
    opened = grammars.guide(constraint, think, in_reasoning=True)
    assert not opened.constraining
    plain = grammars.guide(constraint, None, in_reasoning=False)
    assert not allowed(plain)[think[0]] and allowed(plain)[digit]


def test_tighten_keeps_a_subset_of_the_schema(llm):
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "integer", "minimum": 3}}},
            "x": {"type": ["number", "null"], "multipleOf": 0.5},
        },
        "$defs": {"x": {"properties": {"y": {"type": "number"}}, "additionalProperties": True}},
        "anyOf": [{"properties": {"z": {}}}],
    }
    out = tighten(schema)
    assert out["additionalProperties"] is False
    b = out["properties"]["a"]["properties"]["b"]
    assert out["properties"]["a"]["additionalProperties"] is False
    assert (b["minimum"], b["maximum"]) == (3, 2**53 - 1) and "multipleOf" not in b
    assert out["properties"]["x"]["multipleOf"] == 0.5  # said otherwise: kept
    assert out["$defs"]["x"]["additionalProperties"] is True
    assert out["$defs"]["x"]["properties"]["y"]["multipleOf"] == 1e-9
    assert out["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is untouched
    # The grammar refuses numbers that run on, and takes those that do not.
    tok = LLTokenizer(llm.tokenizer.to_json(), eos_token=list(llm.tokenizer.eos_token_ids))

    def accepts(s: dict, text: str) -> bool:
        m = LLMatcher(tok, LLMatcher.grammar_from_json_schema(tighten(s)), log_level=0)
        ids = tok.tokenize_str(text)
        return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()

    assert accepts({"type": "number"}, "694.5") and not accepts({"type": "number"}, "1." + "0" * 12)
    assert not accepts({"type": "integer"}, "1" * 17) and accepts({"type": "integer"}, "-42")
    date = {"type": "string", "format": "date"}
    assert accepts(date, '"2024-02-29"') and not accepts(date, '"0000-01-01"')
    email = {"type": "string", "format": "email"}
    assert accepts(email, '"ann@example.com"') and not accepts(email, f'"{"a" * 65}@example.com"')
