"""Real models end to end: thrifty's greedy output equals transformers' on the same GGUF file."""

from __future__ import annotations

import pytest
import torch

from thrifty import LLM, SamplingParams

pytestmark = pytest.mark.slow

GREEDY_64 = SamplingParams(max_tokens=64, temperature=0)

CHATS = [
    "What is the capital of France?",
    "Explique-moi en deux phrases pourquoi le ciel est bleu.",
    "请用一句话介绍一下你自己。",
]


def _transformers_greedy(model, prompt_ids: list[list[int]], eos: tuple[int, ...]):
    out = []
    with torch.inference_mode():
        for ids in prompt_ids:
            gen = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=64,
                do_sample=False,
                eos_token_id=list(eos),
                pad_token_id=eos[0],
            )
            out.append(gen[0, len(ids) :].tolist())
    return out


def _chat_ids(llm: LLM, text: str) -> list[int]:
    prompt = llm.chat_prompt([{"role": "user", "content": text}])
    return llm.tokenizer.encode(prompt, add_special_tokens=False)


def test_smollm2_greedy_matches_transformers(smollm2_gguf, smollm2_fp32, transformers_gguf):
    llm = smollm2_fp32
    prompts = [_chat_ids(llm, c) for c in CHATS]
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY_64)]
    reference = transformers_gguf(smollm2_gguf)
    theirs = _transformers_greedy(reference, prompts, llm.tokenizer.eos_token_ids)
    for text, a, b in zip(CHATS, ours, theirs, strict=True):
        assert a == b, f"greedy continuation differs for {text!r}"
    assert "Paris" in llm.tokenizer.decode(ours[0])


def test_qwen_greedy_matches_transformers(qwen_gguf, transformers_gguf):
    llm = LLM("qwen2.5-coder-0.5b-instruct", dtype="float32", progress=False)
    prompts = [_chat_ids(llm, "Write a Python function that reverses a string.")]
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY_64)]
    theirs = _transformers_greedy(
        transformers_gguf(qwen_gguf), prompts, llm.tokenizer.eos_token_ids
    )
    assert ours == theirs
    assert "def " in llm.tokenizer.decode(ours[0])


def test_batched_equals_unbatched(smollm2_fp32):
    # fp32: bf16 matmuls round differently at different batch sizes, so bf16 greedy outputs may
    # part ways after a near tie (as in other engines).
    llm = smollm2_fp32
    topics = ["the sea", "a cat", "Rome", "coffee", "winter", "trains", "music", "bees"]
    prompts = [_chat_ids(llm, f"Write one sentence about {t}.") for t in topics]
    params = SamplingParams(max_tokens=32, temperature=0)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert together == alone
    assert len(set(map(tuple, together))) == len(prompts)
