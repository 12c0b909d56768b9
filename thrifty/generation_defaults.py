"""A model's sampling defaults: its generation_config.json's, else thrifty's own.

Used wherever a request leaves a field out: `thrifty run`/`chat` without the flag, and server
requests that omit it (OpenAI clients usually do). Greedy decoding makes small models loop
(SmolLM2-135M repeats one sentence for 512 tokens) and temperature 1.0 garbles them, so
thrifty's own defaults sample gently. No repetition penalty: it counts the prompt's tokens too
(the chat template's, the question's); on SmolLM2, greedy with 1.1 got 10 of 30 factual answers
fewer, and sampled at 0.7 it changed nothing beyond the noise (benchmarks/sampling_defaults.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thrifty.errors import ThriftyError
from thrifty.files import present, read_json_object

FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


@dataclass(frozen=True)
class GenerationDefaults:
    temperature: float = 0.7  # 0 is greedy
    top_p: float = 0.9
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    source: str = "thrifty's defaults"  # where these came from, for --help and `thrifty show`

    @staticmethod
    def from_dir(path: Path) -> GenerationDefaults:
        """The defaults in `path`/generation_config.json where it names any sampling field
        (the fields it leaves out are then off, as in transformers), else thrifty's."""
        file = Path(path) / "generation_config.json"
        config = read_json_object(file) if present(file) else {}
        named = {k: config[k] for k in FIELDS if config.get(k) is not None}
        if not named and config.get("do_sample") is not False:
            return GenerationDefaults()
        values: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
        values |= {"repetition_penalty": 1.0, **named}
        if config.get("do_sample") is False:  # transformers decodes greedily, whatever else
            values["temperature"] = 0.0
        checks = {
            "temperature": lambda v: v >= 0,
            "top_p": lambda v: 0 < v <= 1,
            "top_k": lambda v: isinstance(v, int) and v >= 0,
            "repetition_penalty": lambda v: v > 0,
        }
        for key, ok in checks.items():
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
                raise ThriftyError(f"{file}: {key} {value!r} is out of range")
        return GenerationDefaults(**values, source=str(file))

    def fill(self, given: dict[str, Any]) -> dict[str, Any]:
        """Every field of FIELDS: the value in `given` where it is not None, else the default."""
        return {k: given[k] if given.get(k) is not None else getattr(self, k) for k in FIELDS}

    def describe(self) -> str:
        values = dataclasses.asdict(self)
        return ", ".join(f"{k} {values[k]:g}" for k in FIELDS)
