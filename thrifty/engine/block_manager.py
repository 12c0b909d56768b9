"""Paged KV-cache bookkeeping: fixed-size blocks, block tables, and a prefix cache.

Pure CPU bookkeeping: no tensors here. A full block whose tokens are all computed is keyed by a
hash of its tokens chained with the hash of the block before it, so equal prefixes map to equal
keys. Blocks are reference-counted; a block whose count drops to zero goes to the back of the free
list but keeps its key, so a later request with the same prefix can take it back until it is
reused (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict

from thrifty.engine.sequence import Sequence

NULL_BLOCK = 0  # never handed out; padded key slots point here and the runner keeps it zeroed


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - 1 - len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _chain(self, prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    def match_prefix(self, seq: Sequence) -> None:
        """Give a new sequence the cached blocks of its longest cached prefix.

        At least the last token is always left to compute, so that the step yields its logits.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = (seq.num_tokens - 1) // bs
        prev: int | None = None
        for i in range(full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = self._chain(prev, tokens)
            block = self.cached.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            prev = h
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * bs
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += seq.num_cached_tokens

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold `num_tokens` tokens; False (and no change) if full."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need > len(self.free_blocks):
            return False
        for _ in range(need):
            block, _ = self.free_blocks.popitem(last=False)
            h = self.block_hash[block]
            if h is not None and self.cached.get(h) == block:
                del self.cached[h]  # evict: the block is about to hold other tokens
            self.block_hash[block] = self.block_tokens[block] = None
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def commit(self, seq: Sequence) -> None:
        """Key the blocks that became full and computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        # Speculative decoding counts accepted drafts as computed before they are appended:
        # key only blocks whose tokens are all known (the rest at the next commit).
        computed = min(seq.num_computed_tokens, seq.num_tokens)
        for i in range(len(seq.block_hashes), computed // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = self._chain(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            block = seq.block_table[i]
            seq.block_hashes.append(h)
            if h not in self.cached:
                self.cached[h] = block
                self.block_hash[block], self.block_tokens[block] = h, tokens

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so that they are evicted before the shared head of a prefix.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0
