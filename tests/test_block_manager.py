"""The paged KV-cache allocator and its prefix cache: pure CPU bookkeeping, no model."""

from __future__ import annotations

import pytest

from thrifty.engine.block_manager import NULL_BLOCK, BlockManager
from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.sequence import Sequence

BS = 4  # tokens per block


class NullDetokenizer:
    def step(self, all_ids: list[int]) -> str:
        return ""


def make_seq(tokens: list[int] | range) -> Sequence:
    params = SamplingParams(max_tokens=8, temperature=0)
    return Sequence("r", 0, list(tokens), params, NullDetokenizer(), max_model_len=1024)


def compute(bm: BlockManager, seq: Sequence) -> None:
    """What the engine does for a whole prompt: allocate, run it (here: nothing), commit."""
    bm.match_prefix(seq)
    assert bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)


def test_allocate_and_free_restore_the_free_count():
    bm = BlockManager(num_blocks=10, block_size=BS)
    assert bm.num_free_blocks == 9 and bm.num_used_blocks == 0
    a, b = make_seq(range(10)), make_seq(range(100, 105))
    assert bm.allocate(a, 10)
    assert len(a.block_table) == 3
    assert bm.allocate(b, 5)
    assert len(b.block_table) == 2
    assert bm.num_free_blocks == 4 and bm.num_used_blocks == 5
    assert all(bm.ref_counts[x] == 1 for x in a.block_table + b.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 7 and a.block_table == [] and a.num_computed_tokens == 0
    bm.free(b)
    assert bm.num_free_blocks == 9 and bm.num_used_blocks == 0
    assert bm.ref_counts == [0] * 10


def test_allocate_grows_a_table_only_by_the_blocks_missing():
    bm = BlockManager(num_blocks=10, block_size=BS)
    seq = make_seq(range(4))
    assert bm.allocate(seq, 4)
    assert len(seq.block_table) == 1
    assert bm.allocate(seq, 4)  # already room: nothing new
    assert len(seq.block_table) == 1
    assert bm.allocate(seq, 5)
    assert len(seq.block_table) == 2
    assert bm.allocate(seq, 8)
    assert len(seq.block_table) == 2
    assert bm.num_used_blocks == 2


def test_allocate_fails_without_side_effects_when_full():
    bm = BlockManager(num_blocks=4, block_size=BS)  # 3 usable blocks
    seq = make_seq(range(13))  # needs 4
    assert not bm.can_allocate(seq, 13)
    assert not bm.allocate(seq, 13)
    assert seq.block_table == [] and bm.num_free_blocks == 3
    assert bm.can_allocate(seq, 12)
    assert bm.allocate(seq, 12)
    assert bm.num_free_blocks == 0
    other = make_seq(range(1))
    assert not bm.can_allocate(other, 1) and not bm.allocate(other, 1)
    assert other.block_table == []


def test_null_block_is_never_handed_out():
    bm = BlockManager(num_blocks=8, block_size=BS)
    for _ in range(3):  # also after blocks are freed and handed out again
        seqs = [make_seq(range(i, i + 5)) for i in range(0, 30, 10)]
        assert bm.allocate(seqs[0], 5) and bm.allocate(seqs[1], 5) and bm.allocate(seqs[2], 12)
        handed = [b for s in seqs for b in s.block_table]
        assert NULL_BLOCK not in handed
        assert sorted(handed) == list(range(1, 8))  # every other block, each once
        assert not bm.allocate(make_seq([1]), 1)
        for s in seqs:
            bm.free(s)


def test_second_sequence_shares_the_cached_full_blocks():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(range(10))  # 2 full blocks and 2 tokens
    compute(bm, a)
    assert len(a.block_hashes) == 2  # only full blocks are keyed
    b = make_seq([*range(8), 50, 51, 52])  # same first 2 blocks, different tail
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2]
    assert [bm.ref_counts[x] for x in b.block_table] == [2, 2]
    assert b.num_cached_tokens == b.num_computed_tokens == 2 * BS
    used = bm.num_used_blocks
    assert bm.allocate(b, b.num_tokens)
    assert bm.num_used_blocks == used + 1
    assert b.block_table[2] != a.block_table[2]
    assert bm.prefix_hits == 2 * BS
    assert bm.prefix_queries == a.num_tokens + b.num_tokens

    # Freeing one holder keeps the shared blocks out of the free list.
    bm.free(a)
    assert [bm.ref_counts[x] for x in b.block_table[:2]] == [1, 1]
    assert not set(b.block_table) & set(bm.free_blocks)
    bm.free(b)
    assert bm.num_used_blocks == 0


@pytest.mark.parametrize("extra", [0, 1, 3])
def test_last_token_is_never_served_from_the_cache(extra):
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(3 * BS + extra))
    compute(bm, make_seq(tokens))  # the whole prompt is cached (its full blocks)
    again = make_seq(tokens)
    bm.match_prefix(again)
    # Full blocks that end before the last token: the last token is left to compute.
    assert again.num_cached_tokens == (len(tokens) - 1) // BS * BS
    assert again.num_cached_tokens < again.num_tokens
    assert again.num_cached_tokens == (2 * BS if extra == 0 else 3 * BS)


def test_same_block_after_a_different_prefix_is_not_shared():
    bm = BlockManager(num_blocks=16, block_size=BS)
    x, y, z, w = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]
    a = make_seq([*x, *y, 0])
    compute(bm, a)
    d = make_seq([*z, *w, 0])
    compute(bm, d)
    # z is cached (from d) and y is cached (from a, after x): z then y is still a miss.
    b = make_seq([*z, *y, 0])
    bm.match_prefix(b)
    assert b.block_table == d.block_table[:1]
    assert b.num_cached_tokens == BS
    assert bm.allocate(b, b.num_tokens)
    b.num_computed_tokens = b.num_tokens
    bm.commit(b)
    assert b.block_table[1] not in (a.block_table[1], d.block_table[1])
    assert b.block_hashes[1] != a.block_hashes[1]
    assert bm.cached[b.block_hashes[1]] == b.block_table[1]
    assert bm.cached[a.block_hashes[1]] == a.block_table[1]


def test_a_hash_collision_does_not_share_other_tokens(monkeypatch):
    bm = BlockManager(num_blocks=16, block_size=BS)
    monkeypatch.setattr(bm, "_chain", lambda prev, tokens: 42)  # every block collides
    a = make_seq([1, 2, 3, 4, 0])
    compute(bm, a)
    b = make_seq([5, 6, 7, 8, 0])
    bm.match_prefix(b)
    assert b.block_table == [] and b.num_cached_tokens == 0


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(range(9))
    compute(bm, a)
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_used_blocks == 0  # free, yet still keyed
    b = make_seq(range(9))
    bm.match_prefix(b)
    assert b.block_table == table[:2]
    assert b.num_cached_tokens == 2 * BS
    assert bm.num_free_blocks == 7 - 2
    assert [bm.ref_counts[x] for x in b.block_table] == [1, 1]


def test_eviction_takes_the_least_recently_freed_block_and_drops_its_hash():
    bm = BlockManager(num_blocks=5, block_size=BS)  # 4 usable blocks
    a = make_seq(range(2 * BS))
    c = make_seq(range(100, 100 + 2 * BS))
    compute(bm, a)
    compute(bm, c)
    a_table, a_hashes = list(a.block_table), list(a.block_hashes)
    c_table, c_hashes = list(c.block_table), list(c.block_hashes)
    bm.free(a)  # freed first: evicted first, its tail block before its head
    bm.free(c)
    assert bm.num_free_blocks == 4

    d = make_seq(range(200, 204))
    assert bm.allocate(d, 4)
    assert d.block_table == [a_table[1]]
    assert a_hashes[1] not in bm.cached
    assert bm.block_hash[a_table[1]] is None
    assert all(h in bm.cached for h in [a_hashes[0], *c_hashes])

    a2 = make_seq([*range(2 * BS), 0])
    bm.match_prefix(a2)
    assert a2.block_table == a_table[:1]  # the head survived, the tail did not
    c2 = make_seq([*range(100, 100 + 2 * BS), 0])
    bm.match_prefix(c2)
    assert c2.block_table == c_table

    e = make_seq(range(300, 304))
    assert not bm.allocate(e, 4)  # a2's and c2's blocks are in use again
    bm.free(d)
    assert bm.allocate(e, 4)
    assert e.block_table == [a_table[1]]


def test_prefix_caching_off_shares_nothing():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    a = make_seq(range(9))
    compute(bm, a)
    assert a.block_hashes == [] and bm.cached == {}
    b = make_seq(range(9))
    bm.match_prefix(b)
    assert b.block_table == [] and b.num_cached_tokens == 0
