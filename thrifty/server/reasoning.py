"""Splits a thinking model's output into reasoning and answer at `<think>...</think>`.

Works on streamed text: a tag may arrive split over several deltas, so a tail that could still
grow into the tag being looked for is held back until the next delta (or `finish`) decides it.
Follows DeepSeek's API: the reasoning goes to `reasoning_content`, the rest to `content`. When the
chat template already wrote `<think>` into the prompt, the output holds only the closing tag:
start the parser with `in_reasoning=True`. Reasoning that never closes (the budget ran out) stays
reasoning.
"""

from __future__ import annotations

from enum import Enum, auto

THINK_START, THINK_END = "<think>", "</think>"


class _State(Enum):
    START = auto()  # nothing but whitespace seen: the output may still open with <think>
    REASONING = auto()
    CONTENT = auto()


class ReasoningParser:
    def __init__(
        self, in_reasoning: bool = False, start_tag: str = THINK_START, end_tag: str = THINK_END
    ):
        self.start_tag, self.end_tag = start_tag, end_tag
        self.state = _State.REASONING if in_reasoning else _State.START
        self._held = ""  # text not yet handed out
        self._strip = in_reasoning  # drop whitespace right after a tag
        self.opened = in_reasoning  # whether the output has a reasoning block at all

    def feed(self, delta: str) -> tuple[str, str]:
        """Take the next piece of output; return the (reasoning, content) text it settles."""
        self._held += delta
        reasoning, content = [], []
        while self._held:
            if self._strip:
                self._held = self._held.lstrip()
                if not self._held:
                    break
                self._strip = False
            if self.state is _State.START:
                text = self._held.lstrip()
                if text.startswith(self.start_tag):
                    self._held = text[len(self.start_tag) :]
                    self.state, self._strip, self.opened = _State.REASONING, True, True
                elif self.start_tag.startswith(text):
                    break  # still could be the opening tag
                else:
                    self.state = _State.CONTENT
            elif self.state is _State.REASONING:
                i = self._held.find(self.end_tag)
                if i >= 0:
                    reasoning.append(self._held[:i])
                    self._held = self._held[i + len(self.end_tag) :]
                    self.state, self._strip = _State.CONTENT, True
                else:
                    keep = partial_tag_len(self._held, self.end_tag)
                    reasoning.append(self._held[: len(self._held) - keep])
                    self._held = self._held[len(self._held) - keep :]
                    break
            else:
                content.append(self._held)
                self._held = ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """The output ended: hand out what was held back."""
        held, self._held = self._held, ""
        if self.state is _State.REASONING:
            return held, ""
        return "", held


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str]:
    """Split a whole output: (reasoning or None when there was none, content)."""
    parser = ReasoningParser(in_reasoning)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return (r1 + r2 if parser.opened else None), c1 + c2


def prompt_opens_reasoning(prompt: str, start_tag: str = THINK_START) -> bool:
    """Whether the chat template left the prompt inside an open `<think>` block."""
    return prompt.rstrip().endswith(start_tag)


def partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
