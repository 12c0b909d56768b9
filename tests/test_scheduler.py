"""The scheduler: token budget, chunked prefill, admission, preemption, siblings; no model.

A fake engine step stands in for the model runner: it marks the scheduled tokens computed,
commits full blocks, and "samples" a token that depends only on the position, so a sequence's
output is the same however it was scheduled (preempted, recomputed, batched).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from thrifty.config import EngineConfig
from thrifty.engine.block_manager import NULL_BLOCK, BlockManager
from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.scheduler import Scheduler
from thrifty.engine.sequence import Sequence, Status

BS = 4  # tokens per block
EOS = (2,)


class NullDetokenizer:
    def step(self, all_ids: list[int]) -> str:
        return ""


def make_seq(
    tokens: list[int] | range,
    max_tokens: int = 4,
    *,
    request_id: str = "r",
    index: int = 0,
    leader: Sequence | None = None,
) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    detok = NullDetokenizer()
    return Sequence(request_id, index, list(tokens), params, detok, 1024, leader)


def make_scheduler(
    num_blocks: int = 64,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 8,
    long_prefill_tokens: int = 512,
) -> Scheduler:
    config = EngineConfig(
        block_size=BS,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        long_prefill_tokens=long_prefill_tokens,
    )
    return Scheduler(config, BlockManager(num_blocks, BS))


def next_token(seq: Sequence) -> int:
    return 1000 + seq.num_tokens  # a function of the position only; never EOS


def step(sched: Scheduler) -> list[tuple[Sequence, int]]:
    """Schedule and 'run' one step the way LLMEngine.step does."""
    batch = sched.schedule()
    check_invariants(sched, batch)
    return run_batch(sched, batch)


def run_batch(sched: Scheduler, batch: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
    for seq, n in batch:
        seq.num_computed_tokens += n
        sched.blocks.commit(seq)
    for seq, _ in batch:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append(next_token(seq), EOS)
            if seq.finish_reason is not None:
                sched.finish(seq, seq.finish_reason)
    return batch


def run_to_end(sched: Scheduler, max_steps: int = 1000) -> int:
    steps = 0
    while sched.has_work():
        assert step(sched), "the scheduler stalled with work left"
        steps += 1
        assert steps < max_steps
    return steps


def check_invariants(sched: Scheduler, batch: list[tuple[Sequence, int]]) -> None:
    bm = sched.blocks
    assert sum(n for _, n in batch) <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    assert all(n >= 1 for _, n in batch)
    assert len({s.seq_id for s, _ in batch}) == len(batch)
    holders = Counter(b for s in sched.running for b in s.block_table)
    assert NULL_BLOCK not in holders
    for block in range(1, bm.num_blocks):
        assert bm.ref_counts[block] == holders[block], f"block {block} has a wrong count"
        assert (block in bm.free_blocks) == (holders[block] == 0)
    for seq in sched.waiting:
        assert seq.status is Status.WAITING and seq.block_table == []
    for seq, n in batch:
        assert seq.status is Status.RUNNING
        assert len(seq.block_table) * BS >= seq.num_computed_tokens + n


def expected_output(prompt_len: int, max_tokens: int) -> list[int]:
    return [1000 + prompt_len + i for i in range(max_tokens)]


def test_long_prompt_is_prefilled_in_chunks_within_the_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    seq = make_seq(range(20), max_tokens=2)
    sched.add(seq)
    assert step(sched) == [(seq, 8)]
    assert seq.num_computed_tokens == 8 and seq.num_output_tokens == 0
    assert step(sched) == [(seq, 8)]
    assert seq.num_output_tokens == 0
    assert step(sched) == [(seq, 4)]  # the prompt's end: one token sampled
    assert seq.num_output_tokens == 1
    assert step(sched) == [(seq, 1)]  # decode
    assert seq.finished and seq.finish_reason == "length"
    assert seq.output_token_ids == expected_output(20, 2)
    assert not sched.has_work() and sched.blocks.num_used_blocks == 0


def test_decoding_sequences_go_before_new_prompts():
    sched = make_scheduler(max_num_batched_tokens=8)
    a = make_seq(range(3), max_tokens=10)
    sched.add(a)
    assert step(sched) == [(a, 3)]
    b = make_seq(range(100, 120), max_tokens=1)
    sched.add(b)
    assert step(sched) == [(a, 1), (b, 7)]  # b takes what the decode leaves
    assert step(sched) == [(a, 1), (b, 7)]
    assert step(sched) == [(a, 1), (b, 6)]
    assert b.finished and b.output_token_ids == expected_output(20, 1)


def test_waiting_prompts_are_admitted_first_come_first_served():
    sched = make_scheduler(max_num_batched_tokens=10)
    seqs = [make_seq(range(10 * i, 10 * i + 6), max_tokens=1) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert step(sched) == [(seqs[0], 6), (seqs[1], 4)]  # the second one is chunked
    assert list(sched.waiting) == [seqs[2]]
    assert step(sched) == [(seqs[1], 2), (seqs[2], 6)]


def test_long_prompts_cannot_hold_up_a_short_one():
    """One client's many long prompts add one chunk of long_prefill_tokens to a step; a short
    prompt that arrives behind them is computed in the very next step."""
    sched = make_scheduler(num_blocks=256, max_num_batched_tokens=64, long_prefill_tokens=16)
    flood = [make_seq(range(1000 * i, 1000 * i + 100), request_id=f"a{i}") for i in range(6)]
    for s in flood:
        sched.add(s)
    assert step(sched) == [(flood[0], 16)]  # one long prompt at a time, in chunks of 16
    short = make_seq(range(500, 505), max_tokens=2, request_id="b")
    sched.add(short)
    assert step(sched) == [(flood[0], 16), (short, 5)]  # admitted ahead of the other five
    assert short.num_output_tokens == 1
    while sched.has_work():
        others = len(sched.waiting) + len(sched.running) > 1
        batch = sched.schedule()
        check_invariants(sched, batch)
        long = [(s, n) for s, n in batch if s.num_tokens - s.num_computed_tokens > 16]
        assert len(long) <= 1
        assert all(n <= 16 for _, n in long) or not others  # alone: whole budgets
        run_batch(sched, batch)
    assert all(s.output_token_ids == expected_output(100, 4) for s in flood)
    assert short.output_token_ids == expected_output(5, 2)
    assert sched.blocks.num_used_blocks == 0


def test_max_num_seqs_bounds_the_running_batch():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(range(10 * i, 10 * i + 3), max_tokens=3) for i in range(5)]
    for s in seqs:
        sched.add(s)
    assert [s for s, _ in step(sched)] == seqs[:2]
    assert sched.running == seqs[:2] and list(sched.waiting) == seqs[2:]
    run_to_end(sched)  # check_invariants holds running <= 2 at every step
    assert all(s.output_token_ids == expected_output(3, 3) for s in seqs)
    assert sched.blocks.num_used_blocks == 0


def test_newest_sequence_is_preempted_when_blocks_run_out_and_resumes_later():
    sched = make_scheduler(num_blocks=5)  # 4 usable blocks: two 2-block sequences
    a = make_seq(range(7), max_tokens=6, request_id="a")
    b = make_seq(range(100, 107), max_tokens=6, request_id="b")
    c = make_seq(range(200, 207), max_tokens=2, request_id="c")
    for s in (a, b, c):
        sched.add(s)
    assert step(sched) == [(a, 7), (b, 7)]  # no block left for c
    assert list(sched.waiting) == [c]
    assert step(sched) == [(a, 1), (b, 1)]  # 9 tokens each now, 8 in the cache
    assert sched.blocks.num_free_blocks == 0

    batch = step(sched)  # a needs a third block: b, the newest, makes room
    assert batch == [(a, 1)]
    assert sched.num_preemptions == 1
    assert b.status is Status.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b, c]  # at the front, ahead of c
    assert sched.running == [a]
    assert b.output_token_ids == expected_output(7, 2)  # its tokens are kept

    run_to_end(sched)
    for seq, prompt_len in ((a, 7), (b, 7), (c, 7)):
        assert seq.finish_reason == "length"
        assert seq.output_token_ids == expected_output(prompt_len, seq.params.max_tokens)
    assert sched.blocks.num_used_blocks == 0


def test_the_newest_sequence_preempts_itself_when_it_is_the_one_short_of_blocks():
    sched = make_scheduler(num_blocks=5)  # 4 usable blocks
    a = make_seq(range(5), max_tokens=4, request_id="a")  # room to grow in its 2nd block
    b = make_seq(range(100, 107), max_tokens=3, request_id="b")
    sched.add(a)
    sched.add(b)
    assert step(sched) == [(a, 5), (b, 7)]
    assert step(sched) == [(a, 1), (b, 1)]
    assert step(sched) == [(a, 1)]  # b needs a third block; a keeps running
    assert b.status is Status.WAITING and b.block_table == [] and sched.running == [a]
    run_to_end(sched)
    assert a.output_token_ids == expected_output(5, 4)
    assert b.output_token_ids == expected_output(7, 3)
    assert sched.blocks.num_used_blocks == 0


def test_siblings_wait_for_the_leaders_prompt_then_hit_the_prefix_cache():
    sched = make_scheduler(max_num_batched_tokens=6)
    prompt = range(10)
    leader = make_seq(prompt, max_tokens=3, index=0)
    sibs = [make_seq(prompt, max_tokens=3, index=i, leader=leader) for i in (1, 2)]
    for s in (leader, *sibs):
        sched.add(s)
    assert step(sched) == [(leader, 6)]
    assert step(sched) == [(leader, 4)]  # budget is left, but the siblings are not ready
    assert all(s.status is Status.WAITING for s in sibs)

    batch = step(sched)
    assert batch == [(leader, 1), (sibs[0], 2), (sibs[1], 2)]
    shared = leader.block_table[:2]
    for s in sibs:
        assert s.num_cached_tokens == 8
        assert s.block_table[:2] == shared
    assert [sched.blocks.ref_counts[b] for b in shared] == [3, 3]

    run_to_end(sched)
    assert all(s.output_token_ids == expected_output(10, 3) for s in (leader, *sibs))
    assert sched.blocks.num_used_blocks == 0


def test_finish_and_abort_free_the_blocks_of_running_and_waiting_sequences():
    sched = make_scheduler(max_num_batched_tokens=8)
    a = make_seq(range(6), max_tokens=50)
    b = make_seq(range(6), max_tokens=50)
    c = make_seq(range(50, 60), max_tokens=50)
    for s in (a, b, c):
        sched.add(s)
    step(sched)
    assert a.status is b.status is Status.RUNNING and c.status is Status.WAITING
    used = sched.blocks.num_used_blocks
    assert used == 3  # a: 2 blocks, b: its own 1 block (the chunk did not reach a's end)

    sched.finish(b, "abort")
    assert b.finished and b.finish_reason == "abort" and b.block_table == []
    assert sched.blocks.num_used_blocks == used - 1
    sched.finish(c, "abort")  # waiting, never scheduled
    assert c.finished and c not in sched.waiting
    sched.finish(a, "abort")
    assert not sched.has_work() and sched.blocks.num_used_blocks == 0


@pytest.mark.parametrize("long_prefill_tokens", [512, 5])
def test_random_workload_finishes_everything_and_leaks_no_block(long_prefill_tokens):
    rng = random.Random(1234)
    sched = make_scheduler(
        num_blocks=13, max_num_batched_tokens=16, max_num_seqs=5,
        long_prefill_tokens=long_prefill_tokens,
    )  # fmt: skip
    prefixes = [[rng.randrange(3, 500) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    seqs = []
    for r in range(12):
        prompt = rng.choice(prefixes) + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 9))]
        n = rng.choice([1, 1, 2, 3])
        max_tokens = rng.randrange(1, 14)
        leader = None
        for i in range(n):
            s = make_seq(prompt, max_tokens, request_id=f"r{r}", index=i, leader=leader)
            leader = leader or s
            seqs.append(s)
            sched.add(s)
    run_to_end(sched)
    assert sched.num_preemptions > 0  # the pool is small enough to force some
    assert sched.blocks.prefix_hits > 0
    for s in seqs:
        assert s.finish_reason == "length"
        assert s.output_token_ids == expected_output(s.num_prompt_tokens, s.params.max_tokens)
    assert sched.blocks.num_used_blocks == 0
    assert sched.blocks.ref_counts == [0] * sched.blocks.num_blocks
