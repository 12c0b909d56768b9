"""The engine end to end on the real SmolLM2-135M-Instruct (fp32): stop conditions, seeds, n > 1,
logprobs, streaming, incremental detokenization, aborts, input errors and the chat template.

Expected outputs are never written down: each check derives them from a greedy baseline run of
the same engine, so the tests pin the engine's behaviour, not one checkpoint's wording. The
requests share two continuous batches (fixtures `first` and `second`) to keep the file fast.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from thrifty import LLM, CompletionOutput, RequestOutput, SamplingParams, ThriftyError, hub
from thrifty.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

COUNT = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
PARIS = [{"role": "user", "content": "What is the capital of France?"}]
POEM = [{"role": "user", "content": "Write a short poem about the sea."}]
MOON = [{"role": "user", "content": "请用中文写一首关于月亮的短诗，并加上表情符号 🌙✨"}]
GREEDY = SamplingParams(max_tokens=12, temperature=0)
SEEDED = SamplingParams(n=4, seed=123, temperature=1.0, max_tokens=8)
LOGPROBS = SamplingParams(temperature=0, max_tokens=4, logprobs=3)


@pytest.fixture(scope="module")
def llm(smollm2_fp32) -> LLM:
    # One intra-op thread: on a small shared CPU, spinning OpenMP workers that wait for a
    # busy core make each step several times slower than one thread does.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield smollm2_fp32
    torch.set_num_threads(threads)
    engine = smollm2_fp32.engine
    assert not engine.requests and not engine.has_unfinished()
    assert engine.blocks.num_used_blocks == 0


def chat_ids(llm: LLM, messages) -> list[int]:
    return llm._chat_ids(messages)


@dataclass
class Run:
    output: RequestOutput
    deltas: dict[int, list[str]]  # per sample: every delta_text the engine produced, in order

    @property
    def out(self) -> CompletionOutput:
        return self.output.outputs[0]


def run_together(llm: LLM, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    """Generate for all requests in one continuous batch, recording the streamed deltas.

    A CPU step costs about the same for one sequence as for ten, so the checks below share two
    batches instead of running one after another.
    """
    engine = llm.engine
    rids = {name: engine.add_request(prompt, p) for name, (prompt, p) in requests.items()}
    deltas: dict[str, dict[int, list[str]]] = {rid: defaultdict(list) for rid in rids.values()}
    while engine.has_unfinished():
        for out in engine.step():
            deltas[out.request_id][out.index].append(out.delta_text)
    return {
        name: Run(RequestOutput.of(engine.pop_finished(rid)), deltas[rid])
        for name, rid in rids.items()
    }


@pytest.fixture(scope="module")
def first(llm) -> dict[str, Run]:
    """Greedy baselines, a seeded n=4 request, logprobs and text that splits characters."""
    runs = run_together(
        llm,
        {
            "count": (chat_ids(llm, COUNT), GREEDY),
            "paris": (chat_ids(llm, PARIS), GREEDY),
            "seeded": (chat_ids(llm, POEM), SEEDED),
            "logprobs": (chat_ids(llm, PARIS), LOGPROBS),
            "moon": (chat_ids(llm, MOON), GREEDY),
            "moon_raw": (llm.tokenizer.encode("月亮是"), GREEDY),
            "emoji_raw": (llm.tokenizer.encode("My favourite emoji are 🌙✨🌊🐳🔥 and"), GREEDY),
        },
    )
    count, paris = runs["count"].output.outputs[0], runs["paris"].output.outputs[0]
    assert count.finish_reason == "length" and len(count.token_ids) == GREEDY.max_tokens
    assert paris.finish_reason == "stop" and paris.token_ids[-1] in llm.tokenizer.eos_token_ids
    assert "Paris" in paris.text
    return runs


@pytest.fixture(scope="module")
def stop_at(first) -> tuple[str, int]:
    """A stop string and a stop token taken from the middle of the greedy COUNT baseline."""
    text, ids = first["count"].out.text, first["count"].out.token_ids
    mid = len(text) // 2
    stop = text[mid : mid + 3]  # usually spans tokens; its first occurrence may be earlier
    assert stop.strip(), f"degenerate stop string {stop!r} from {text!r}"
    return stop, ids[len(ids) // 2]


@pytest.fixture(scope="module")
def second(llm, first, stop_at) -> dict[str, Run]:
    """Every stop condition against the baselines, the seeded request again among other
    companions, greedy n=2, and the logprob prompts recomputed by prefill."""
    stop, stop_id = stop_at
    count_ids, paris_ids, poem_ids = (chat_ids(llm, m) for m in (COUNT, PARIS, POEM))
    lp_tokens = first["logprobs"].out.token_ids
    requests = {
        "random": (paris_ids, SamplingParams(temperature=1.0, max_tokens=8)),  # unseeded
        "greedy_pair": (poem_ids, SamplingParams(n=2, temperature=0, max_tokens=8)),
        "stop": (count_ids, replace(GREEDY, stop=["never-in-the-output", stop])),
        "stop_incl": (count_ids, replace(GREEDY, stop=[stop], include_stop_str_in_output=True)),
        "stop_absent": (count_ids, replace(GREEDY, stop=["never-in-the-output"])),
        "stop_token": (count_ids, replace(GREEDY, stop_token_ids=[stop_id])),
        "max_tokens": (count_ids, replace(GREEDY, max_tokens=5)),
        "ignore_eos": (
            paris_ids,
            replace(GREEDY, ignore_eos=True, max_tokens=len(first["paris"].out.token_ids) + 3),
        ),
        "seeded": (poem_ids, SEEDED),  # a new request, other companions, another row
        "no_logprobs": (paris_ids, replace(LOGPROBS, logprobs=None, max_tokens=1)),
    }
    for i in range(len(lp_tokens)):
        requests[f"logprobs_{i}"] = (paris_ids + lp_tokens[:i], replace(LOGPROBS, max_tokens=1))
    return run_together(llm, requests)


def test_stop_string_truncates_the_output_before_it(first, second, stop_at):
    text, stop = first["count"].out.text, stop_at[0]
    out = second["stop"].out
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]


def test_include_stop_str_in_output_keeps_it(first, second, stop_at):
    text, stop = first["count"].out.text, stop_at[0]
    out = second["stop_incl"].out
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop) + len(stop)]
    assert out.text.endswith(stop)


def test_absent_stop_string_changes_nothing(first, second):
    count = first["count"].out
    out = second["stop_absent"].out
    assert out.finish_reason == "length"
    assert (out.text, out.token_ids) == (count.text, count.token_ids)


def test_stop_token_ids_end_the_output_at_the_first_such_token(llm, first, second, stop_at):
    ids = first["count"].out.token_ids
    out = second["stop_token"].out
    j = ids.index(stop_at[1])
    assert out.finish_reason == "stop"
    assert out.token_ids == ids[: j + 1]
    assert out.text == llm.tokenizer.decode(ids[:j])  # the stop token itself is not text


def test_max_tokens_gives_length_and_exactly_that_many_tokens(first, second):
    out = second["max_tokens"].out
    assert out.finish_reason == "length"
    assert out.token_ids == first["count"].out.token_ids[:5]


def test_ignore_eos_generates_past_the_eos_token(first, second):
    paris = first["paris"].out
    out = second["ignore_eos"].out
    assert out.finish_reason == "length"
    assert len(out.token_ids) == len(paris.token_ids) + 3
    assert out.token_ids[: len(paris.token_ids)] == paris.token_ids  # EOS included, then on
    assert out.text.startswith(paris.text)


def test_seeded_n4_is_reproducible_across_calls_and_batch_companions(first, second):
    alone = first["seeded"].output.outputs
    assert [c.index for c in alone] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 or c.finish_reason == "stop" for c in alone)
    assert len({tuple(c.token_ids) for c in alone}) > 1  # each sample has its own stream
    # A new request with the same seed, in another batch at another row: the same samples.
    again = second["seeded"].output.outputs
    assert [c.token_ids for c in again] == [c.token_ids for c in alone]
    assert [c.text for c in again] == [c.text for c in alone]


def test_greedy_n2_gives_identical_samples(second):
    a, b = second["greedy_pair"].output.outputs
    assert (a.index, b.index) == (0, 1)
    assert a.token_ids == b.token_ids and a.text == b.text and a.text


def test_logprobs_for_each_token_match_a_fresh_prefill(first, second):
    out = first["logprobs"].out
    assert len(out.logprobs) == len(out.token_ids) == LOGPROBS.max_tokens
    for i, (lp, token) in enumerate(zip(out.logprobs, out.token_ids, strict=True)):
        assert lp.token_id == token
        assert len(lp.top) == 3
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert lp.top[0] == (token, lp.logprob)  # greedy picks the most likely token
        assert lp.logprob <= 0
        # The same position computed by a prefill of the prompt and the tokens before it.
        fresh = second[f"logprobs_{i}"].out.logprobs[0]
        assert fresh.token_id == token
        assert fresh.logprob == pytest.approx(lp.logprob, abs=1e-3)
        assert [t for t, _ in fresh.top] == [t for t, _ in lp.top]
    assert second["no_logprobs"].out.logprobs is None


@pytest.mark.parametrize("name", ["moon", "moon_raw", "emoji_raw"])
def test_incremental_detokenization_never_splits_a_character(llm, first, name):
    run = first[name]
    out = run.out
    deltas = run.deltas[0]
    assert len(deltas) == len(out.token_ids)  # one step output per token
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == out.text
    # Bytes of a character cut off by max_tokens are never shown.
    assert out.text == llm.tokenizer.decode(out.token_ids).rstrip("\ufffd")
    held_back = sum(d == "" for d in deltas)
    splits = sum("\ufffd" in llm.tokenizer.decode([t]) for t in out.token_ids)
    assert splits and held_back, "no multi-token character was generated: nothing was tested"


def test_stream_concatenates_to_the_greedy_text(llm, first):
    deltas = list(llm.stream(PARIS, GREEDY))
    assert len(deltas) > 1
    assert "".join(deltas) == first["paris"].out.text


def test_stream_holds_back_a_partial_stop_string(llm, second, stop_at):
    deltas = list(llm.stream(COUNT, replace(GREEDY, stop=[stop_at[0]])))
    assert "".join(deltas) == second["stop"].out.text


def test_closing_a_stream_early_frees_every_block(llm):
    engine = llm.engine
    stream = llm.stream(POEM, SamplingParams(temperature=0, max_tokens=64))
    next(stream)
    next(stream)
    assert engine.blocks.num_used_blocks > 0 and len(engine.requests) == 1
    stream.close()
    assert engine.blocks.num_used_blocks == 0
    assert not engine.requests and not engine.has_unfinished()


def test_prompt_longer_than_the_context_is_refused(llm):
    too_long = [1] * llm.engine.max_model_len
    with pytest.raises(ThriftyError, match="context"):
        llm.generate(too_long, GREEDY)
    with pytest.raises(ThriftyError, match="context"):  # the first request is rolled back
        llm.generate(["Hello", too_long], GREEDY)
    assert not llm.engine.requests and llm.engine.blocks.num_used_blocks == 0


def test_empty_or_invalid_prompt_is_refused(llm):
    vocab_size = llm.engine.model_config.vocab_size
    for prompt, message in (("", "empty"), ([[]], "empty"), ([[5, vocab_size]], "token ids")):
        with pytest.raises(ThriftyError, match=message):
            llm.generate(prompt, GREEDY)
    assert not llm.engine.requests


@pytest.mark.parametrize(
    "bad", [{"temperature": -1.0}, {"top_p": 0.0}, {"n": 0}, {"max_tokens": 0}, {"top_k": -1}]
)
def test_bad_sampling_params_are_refused(bad):
    with pytest.raises(ThriftyError):
        SamplingParams(**bad)


SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_chat_template_renders_chatml(llm):
    rendered = llm.chat_prompt([{"role": "user", "content": "hi"}])
    assert rendered == (
        f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "bye"},
    ]
    assert llm.chat_prompt(conversation) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = chat_ids(llm, PARIS)
    assert ids[0] == llm.tokenizer.bos_token_id  # <|im_start|> is one special token
    assert llm.tokenizer.decode(ids, skip_special_tokens=False) == llm.chat_prompt(PARIS)


@pytest.fixture(scope="module")
def hf_tokenizer() -> HFTokenizer:
    path = hub.resolve("smollm2-135m-instruct", progress=False)
    return HFTokenizer.from_file(str(path / "tokenizer.json"))


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ raise_exception('no system role') }}",
    ],
)
def test_chat_template_is_sandboxed(hf_tokenizer, template):
    tok = Tokenizer(hf_tokenizer, {"chat_template": template}, (2,))
    with pytest.raises(ThriftyError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_malformed_chat_template_is_a_thrifty_error(hf_tokenizer):
    with pytest.raises(ThriftyError, match="chat template"):
        Tokenizer(hf_tokenizer, {"chat_template": "{% for %}"}, (2,))


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None}])
def test_malformed_message_is_a_thrifty_error(llm, message):
    with pytest.raises(ThriftyError, match="chat template"):
        llm.chat_prompt([message])


def test_a_bfloat16_kv_cache_holds_twice_the_tokens_and_keeps_the_greedy_answers(llm):
    # --kv-cache-dtype bfloat16 under SmolLM2's float32 activations: half the bytes a token in
    # the same memory, and the compiled decode path reading it gives the same greedy tokens
    # on a batch of prompts, but where the float32 cache's two best tokens are a near tie: keys
    # and values rounded to bfloat16 move the logprobs by ~1e-2 (MOON's 17th token was 0.014
    # ahead of the next, and flipped when x's group sums were added in another order).
    half = LLM("smollm2-135m-instruct", dtype="float32", kv_cache_dtype="bfloat16", progress=False)
    assert half.engine.runner.kv_cache.dtype == torch.bfloat16
    assert half.engine.runner.num_blocks == 2 * llm.engine.runner.num_blocks
    prompts = [chat_ids(llm, m) for m in (COUNT, PARIS, POEM, MOON)]
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=2, ignore_eos=True)
    same = 0
    for w, g in zip(llm.generate(prompts, params), half.generate(prompts, params), strict=True):
        want, got = w.outputs[0], g.outputs[0]
        if got.token_ids == want.token_ids:
            same += 1
            continue
        pairs = zip(want.token_ids, got.token_ids, strict=True)
        j = next(i for i, (a, b) in enumerate(pairs) if a != b)
        (_, best), (_, second) = want.logprobs[j].top[:2]
        assert best - second < 0.05, (j, want.logprobs[j], got.logprobs[j])
    assert same >= 3
