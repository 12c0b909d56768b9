"""`thrifty chat`: a terminal conversation with line editing, history and slash commands.

On a terminal the prompt is prompt_toolkit's: arrow keys, history kept across sessions, and a
pasted block of lines is one message (bracketed paste). Through a pipe it reads plain lines, so
scripts and tests can drive it. Either way, a message between two lines of `\"\"\"` may span
lines.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from typing import Any

from thrifty.engine.sampling_params import SamplingParams
from thrifty.errors import ThriftyError

HELP = """\
/help                 this list
/model                the model and its sampling settings
/model NAME           load another model (the conversation is kept)
/system [TEXT]        show, or set, the system message (empty TEXT removes it)
/set                  show the sampling settings
/set NAME VALUE       change one: temperature, top_p, top_k, min_p, repetition_penalty,
                      max_tokens or seed (e.g. /set temperature 0.2; 0 is greedy)
/reset                clear the conversation
/exit, /bye, Ctrl-D   leave
Ctrl-C stops an answer. A message between two lines of \"\"\" may span lines; so may a paste.
"""
SETTABLE = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
    "max_tokens": int,
    "seed": int,
}


def stream_answer(llm: Any, prompt: Any, params: SamplingParams) -> str:
    """Print the answer as it comes; Ctrl-C stops this answer only. Returns the text."""
    parts = []
    stream = llm.stream(prompt, params)
    try:
        for delta in stream:
            parts.append(delta)
            print(delta, end="", flush=True)
    except KeyboardInterrupt:
        stream.close()  # aborts the request and frees its blocks
        print(" [stopped]", end="")
    print(flush=True)
    return "".join(parts)


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _piped_lines(prompt: str) -> Iterator[str]:
    while True:
        print(prompt, end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


def _terminal_lines(prompt: str) -> Iterator[str]:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    from thrifty import hub

    try:
        hub.home().mkdir(parents=True, exist_ok=True)
        history: Any = FileHistory(str(hub.home() / "chat_history"))
    except OSError:  # a read-only home: history for this session only
        history = InMemoryHistory()
    session: PromptSession[str] = PromptSession(history=history)
    while True:
        try:
            yield session.prompt(prompt)
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in a shell
            continue
        except EOFError:
            return


def messages(lines: Iterator[str]) -> Iterator[str]:
    """Messages from input lines: one line each, or the lines between two \"\"\" lines."""
    for line in lines:
        if line.strip().startswith('"""'):
            block = [line.strip()[3:]]
            for more in lines:
                if more.rstrip().endswith('"""'):
                    block.append(more.rstrip()[:-3])
                    break
                block.append(more)
            yield "\n".join(block).strip()
        else:
            yield line.strip()


class Chat:
    """One conversation with a model; `load(name)` gives the LLM for /model NAME."""

    def __init__(
        self,
        llm: Any,
        model_name: str,
        params: SamplingParams,
        system: str | None,
        load: Callable[[str], tuple[Any, SamplingParams]],
    ):
        self.llm, self.model_name, self.params, self.load = llm, model_name, params, load
        self.system = system or ""
        self.history: list[dict[str, str]] = []

    def banner(self) -> str:
        return f"thrifty chat with {self.model_name} ({self.settings()}); /help for commands"

    def settings(self) -> str:
        p = self.params
        return ", ".join(f"{k} {getattr(p, k)}" for k in SETTABLE if getattr(p, k) is not None)

    def run(self, lines: Iterator[str]) -> None:
        for text in messages(lines):
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return
                continue
            self.ask(text)

    def ask(self, text: str) -> None:
        system = [{"role": "system", "content": self.system}] if self.system else []
        turn = [*self.history, {"role": "user", "content": text}]
        try:
            answer = stream_answer(self.llm, [*system, *turn], self.params)
        except ThriftyError as e:  # e.g. the conversation outgrew the context
            _note(f"error: {e}")
            return
        self.history = [*turn, {"role": "assistant", "content": answer}]

    def command(self, text: str) -> bool:
        """Run one slash command; False to leave."""
        name, _, rest = text.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name in ("/help", "/?"):
            _note(HELP.rstrip())
        elif name == "/reset":
            self.history = []
            _note("(conversation cleared)")
        elif name == "/system":
            if rest or text.rstrip() != "/system":
                self.system = rest
            _note(f"(system: {self.system!r})" if self.system else "(no system message)")
        elif name == "/set":
            self.set(rest)
        elif name == "/model":
            if rest:
                self.switch(rest)
            where = getattr(self.llm, "location", None) or self.llm.engine.path
            _note(f"{self.model_name} at {where} ({self.settings()})")
        else:
            _note(f"unknown command {name}; /help lists them")
        return True

    def set(self, rest: str) -> None:
        if not rest:
            _note(self.settings())
            return
        key, _, value = rest.partition(" ")
        key = key.replace("-", "_")
        if key not in SETTABLE or not value.strip():
            _note(f"usage: /set NAME VALUE, NAME one of {', '.join(SETTABLE)}")
            return
        try:
            self.params = dataclasses.replace(self.params, **{key: SETTABLE[key](value)})
        except (ValueError, ThriftyError) as e:
            _note(f"error: {key}: {e}")
            return
        _note(f"({key} = {getattr(self.params, key)})")

    def switch(self, name: str) -> None:
        try:
            llm, params = self.load(name)
        except ThriftyError as e:
            _note(f"error: {e}")
            return
        self.llm, self.model_name = llm, name
        # The new model's defaults, with what was /set that they do not cover kept.
        self.params = dataclasses.replace(params, max_tokens=self.params.max_tokens)


def chat(chat: Chat) -> None:
    """The loop: a prompt_toolkit prompt on a terminal, plain lines through a pipe."""
    _note(chat.banner())
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    chat.run(_terminal_lines(">>> ") if terminal else _piped_lines(">>> "))
    if not terminal:
        print()
