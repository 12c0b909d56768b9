"""Problems with known answers for `thrifty eval`: reasoning-gym tasks generated offline from a
fixed seed, or a JSONL file of {"question": ..., "answer": ...}."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thrifty.errors import ThriftyError
from thrifty.tts.extract import to_number

TASKS = ("basic_arithmetic", "gsm_symbolic")
# The size the issue asks for: 3 to 4 terms of 1 to 2 digits.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {"min_terms": 3, "max_terms": 4, "min_digits": 1, "max_digits": 2},
    "gsm_symbolic": {},
}
INSTRUCTION = "\nSolve it step by step, briefly, and end with: The answer is N."


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str

    def messages(self, instruction: str = INSTRUCTION) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question + instruction}]


def all_numeric(problems: list[Problem]) -> bool:
    """Whether every gold answer is a number: then only numeric answers need vote."""
    return all(to_number(p.answer) is not None for p in problems)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """["min_terms=3", "max_digits=2"] -> {"min_terms": 3, "max_digits": 2} (numbers parsed)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ThriftyError(f"task option {pair!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def load_problems(
    task: str | None = None,
    size: int = 50,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    data: str | Path | None = None,
) -> list[Problem]:
    """`size` problems of a reasoning-gym `task`, or every line of the JSONL file `data`."""
    if data is not None:
        return _load_jsonl(Path(data))[:size] if size else _load_jsonl(Path(data))
    if task not in TASKS:
        raise ThriftyError(f"unknown task {task!r}; use one of {', '.join(TASKS)} or --data FILE")
    try:
        import reasoning_gym
    except ImportError:
        raise ThriftyError("reasoning-gym is not installed: pip install 'thrifty[tts]'") from None
    kwargs = {**DEFAULT_OPTIONS[task], **(options or {})}
    try:
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ThriftyError(f"bad options for {task}: {e}") from None
    return [Problem(x["question"], str(x["answer"])) for x in dataset]


def _load_jsonl(path: Path) -> list[Problem]:
    if not path.is_file():
        raise ThriftyError(f"no such data file: {path}")
    problems = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problems.append(Problem(str(row["question"]), str(row["answer"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ThriftyError(
                f"{path}:{i}: each line must be a JSON object with 'question' and 'answer'"
            ) from None
    if not problems:
        raise ThriftyError(f"{path} holds no problems")
    return problems
