"""A sequence being generated: its tokens, how many are in the KV cache, its output so far."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.structured import Guide
from thrifty.tokenizer import IncrementalDetokenizer, Tokenizer


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely (token id, logprob), best first


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    max_model_len: int
    leader: Sequence | None = None  # a sibling whose prompt prefill this one waits for
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, found in the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash chain of full, computed blocks
    status: Status = Status.WAITING
    finish_reason: str | None = None
    output_text: str = ""
    emitted_len: int = 0  # characters of output_text already handed to the caller
    logprobs: list[TokenLogprob] = field(default_factory=list)
    generator: torch.Generator | None = None
    # Called with each sampled token; returns the tokens to append in its place (the token
    # itself, others, or it followed by more). The injected tokens are computed by the next
    # step like a prompt chunk, on the same KV cache. Test-time scaling uses it for a
    # thinking budget (thrifty.tts.thinking).
    token_hook: Callable[[Sequence, int], list[int]] | None = None
    guide: Guide | None = None  # structured output: where the sequence is in its grammar

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)
        if self.params.seed is not None:
            # Each sample of a seeded request draws from its own stream, whatever the batch.
            self.generator = torch.Generator().manual_seed(
                self.params.seed * 1_000_003 + self.index
            )

    @staticmethod
    def create(
        request_id: str,
        index: int,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        max_model_len: int,
        leader: Sequence | None = None,
    ) -> Sequence:
        detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        return Sequence(request_id, index, list(prompt_ids), params, detok, max_model_len, leader)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def ready(self) -> bool:
        """Whether it may be admitted: siblings wait until the leader's prompt is in the cache."""
        lead = self.leader
        return lead is None or lead.finished or lead.num_computed_tokens >= lead.num_prompt_tokens

    def append(self, token_id: int, eos_token_ids: tuple[int, ...]) -> list[int]:
        """Add a sampled token (or what the token hook puts in its place), update the text, and
        decide whether the sequence is done. Returns the tokens appended."""
        ids = self.token_hook(self, token_id) if self.token_hook is not None else [token_id]
        for i, t in enumerate(ids):
            self._append_one(t, eos_token_ids)
            if self.finish_reason is not None:
                return ids[: i + 1]
        return ids

    def _append_one(self, token_id: int, eos_token_ids: tuple[int, ...]) -> None:
        self.token_ids.append(token_id)
        p = self.params
        stop_token = token_id in p.stop_token_ids or (
            not p.ignore_eos and token_id in eos_token_ids
        )
        if self.guide is not None:
            self.guide.accept(token_id)
        if not stop_token:
            self.output_text += self.detokenizer.step(self.token_ids)
            if p.stop and self._truncate_at_stop():
                self.finish_reason = "stop"
                return
        if stop_token or (self.guide is not None and self.guide.done):  # or the grammar is
            self.finish_reason = "stop"  # complete: nothing but EOS could follow
        elif self.num_output_tokens >= p.max_tokens or self.num_tokens >= self.max_model_len:
            self.finish_reason = "length"

    def _truncate_at_stop(self) -> bool:
        longest = max(len(s) for s in self.params.stop)
        start = max(self.emitted_len - longest, 0)
        hits = [(i, s) for s in self.params.stop if (i := self.output_text.find(s, start)) >= 0]
        if not hits:
            return False
        i, s = min(hits)
        self.output_text = self.output_text[
            : i + len(s) if self.params.include_stop_str_in_output else i
        ]
        return True

    def take_delta(self) -> str:
        """Text not yet handed out, holding back a tail that may still grow into a stop string."""
        end = len(self.output_text)
        if self.finish_reason is None and self.params.stop:
            end -= _partial_stop_len(self.output_text, self.params.stop)
        delta = self.output_text[self.emitted_len : end]
        self.emitted_len = max(self.emitted_len, end)
        return delta


def _partial_stop_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string.

    Only the k where the stop's k-th character is the text's last can match, so each stop is
    scanned with rfind: for ordinary text a few comparisons, not one per prefix length."""
    best = 0
    if not text:
        return 0
    last = text[-1]
    for s in stops:
        k = min(len(s) - 1, len(text))
        while k > best:
            k = s.rfind(last, 0, k) + 1  # the longest candidate prefix ending in `last`
            if k <= best:
                break
            if text.endswith(s[:k]):
                best = k
                break
            k -= 1
    return best
