"""Decides what each step computes: pure CPU bookkeeping over sequences and blocks.

One token budget per step (`max_num_batched_tokens`). Running sequences go first: a decoding
sequence takes one token, a sequence still in its prompt takes the next chunk. What budget is left
admits waiting sequences, their prompts chunked to fit: short ones first come first served, then
long ones (more than `long_prefill_tokens` to compute), one long prompt at a time. While other
sequences run or wait, a long prompt prefills in chunks of at most `long_prefill_tokens`: so a
client's long prompts, however many, add at most one such chunk to a step, a step stays short,
and a short prompt that arrives behind them is computed in the next one. When blocks run out,
the newest running sequence is preempted: its blocks are freed and it waits at the front of the
queue to be recomputed (cheaply, from the prefix cache where its blocks survive).
"""

from __future__ import annotations

from collections import deque

from thrifty.config import EngineConfig
from thrifty.engine.block_manager import BlockManager
from thrifty.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.long_prefill_tokens = config.long_prefill_tokens
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _remaining(self, seq: Sequence) -> int:
        return seq.num_tokens - seq.num_computed_tokens

    def _is_long(self, seq: Sequence) -> bool:
        return self._remaining(seq) > self.long_prefill_tokens

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The (sequence, number of new tokens) pairs to compute in the next forward pass."""
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        long_active = False  # a long prompt is being prefilled this step
        # Alone, a long prompt takes whole budgets (fewer steps); beside others, short chunks.
        cap = self.long_prefill_tokens if self.waiting or len(self.running) > 1 else budget
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(self._remaining(seq), budget)
            if self._is_long(seq):
                n, long_active = min(n, cap), True
            while not self.blocks.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.append((seq, n))
                budget -= n
                i += 1
                continue
            break
        # Short prompts first, in order; then long ones, one at a time.
        for want_long in (False, True):
            for seq in list(self.waiting):
                if budget <= 0 or len(self.running) >= self.max_num_seqs:
                    return batch
                if not seq.ready or self._is_long(seq) != want_long:
                    continue
                if want_long and long_active:
                    break
                self.blocks.match_prefix(seq)
                n = min(self._remaining(seq), budget)
                if self._is_long(seq):  # (the prefix cache may have made it short)
                    n, long_active = min(n, self.long_prefill_tokens), True
                if not self.blocks.allocate(seq, seq.num_computed_tokens + n):
                    self.blocks.free(seq)  # give back the prefix blocks it just took
                    return batch
                self.waiting.remove(seq)
                seq.status = Status.RUNNING
                self.running.append(seq)
                batch.append((seq, n))
                budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (done, or aborted by the caller) and free its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or reason
        self.blocks.free(seq)
