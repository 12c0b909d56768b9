"""A thinking budget for models that reason inside `<think> ... </think>`, as a token hook.

The engine calls the hook with every sampled token of a sequence (LLMEngine.add_request's
`token_hook`); the hook returns what to append instead. Injected tokens are computed by the next
step on the same sequence and KV cache, like a prompt chunk: nothing is recomputed.

- Maximum: when the reasoning reaches `max_tokens` tokens, `</think>` and an answer cue are
  appended after it, so the reasoning is exactly `max_tokens` tokens long.
- Minimum ("budget forcing", Muennighoff et al. 2025, s1): when the model samples `</think>` (or
  end of sequence) before `min_tokens`, that token is dropped and a continuation word ("Wait")
  is appended in its place.
"""

from __future__ import annotations

from dataclasses import dataclass

from thrifty.engine.sequence import Sequence
from thrifty.errors import ThriftyError
from thrifty.tokenizer import Tokenizer


@dataclass
class _State:
    inside: bool  # between <think> and </think>
    closed: bool = False  # the thinking block has ended: the hook stands aside
    count: int = 0  # reasoning tokens so far, injected ones included


class ThinkingBudget:
    def __init__(
        self,
        tokenizer: Tokenizer,
        max_tokens: int | None = None,
        min_tokens: int = 0,
        *,
        start: str = "<think>",
        end: str = "</think>",
        answer_cue: str = "\n\nThe answer is",
        wait: str = "\nWait",
    ):
        if max_tokens is not None and max_tokens < 0:
            raise ThriftyError("max_thinking_tokens must be >= 0")
        if min_tokens < 0 or (max_tokens is not None and min_tokens > max_tokens):
            raise ThriftyError("min_thinking_tokens must be in [0, max_thinking_tokens]")
        self.start_id = self._single(tokenizer, start)
        self.end_id = self._single(tokenizer, end)
        self.close_ids = [self.end_id, *tokenizer.encode(answer_cue, add_special_tokens=False)]
        self.wait_ids = tokenizer.encode(wait, add_special_tokens=False)
        self.eos_ids = set(tokenizer.eos_token_ids)
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        self._states: dict[int, _State] = {}

    @staticmethod
    def _single(tokenizer: Tokenizer, text: str) -> int:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ThriftyError(
                f"a thinking budget needs {text!r} to be one token in this model's vocabulary"
                f" (it is {len(ids)}): this is not a thinking model"
            )
        return ids[0]

    def _state(self, seq: Sequence) -> _State:
        state = self._states.get(seq.seq_id)
        if state is None:
            # A chat template may open the block in the prompt ("...assistant\n<think>\n").
            prompt = seq.token_ids[: seq.num_prompt_tokens]
            opened = max((i for i, t in enumerate(prompt) if t == self.start_id), default=-1)
            closed = max((i for i, t in enumerate(prompt) if t == self.end_id), default=-1)
            state = self._states[seq.seq_id] = _State(inside=opened > closed)
        return state

    def __call__(self, seq: Sequence, token: int) -> list[int]:
        state = self._state(seq)
        if state.closed:
            return [token]
        if not state.inside:
            state.inside = token == self.start_id
            if state.inside and self.max_tokens == 0:
                state.closed = True
                return [token, *self.close_ids]
            return [token]
        if token == self.end_id or token in self.eos_ids:
            if state.count >= self.min_tokens:
                state.closed = True
                return [token]
            if self.max_tokens is not None and state.count + len(self.wait_ids) > self.max_tokens:
                state.closed = True  # no room left to wait: close at the budget instead
                return self.close_ids
            state.count += len(self.wait_ids)
            return list(self.wait_ids)
        state.count += 1
        if self.max_tokens is not None and state.count >= self.max_tokens:
            state.closed = True
            return [token, *self.close_ids]
        return [token]

    def thinking_tokens(self, seq: Sequence) -> int:
        """How many reasoning tokens `seq` has produced so far."""
        return self._state(seq).count
