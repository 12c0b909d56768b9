"""thrifty: run open-weight LLMs on the hardware you have.

The engine's names load on first use: `import thrifty` (and the command line's client path,
`thrifty run --url`) does not import torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from thrifty.errors import ThriftyError
from thrifty.lazy import exports

if TYPE_CHECKING:
    from thrifty.engine.sampling_params import SamplingParams
    from thrifty.llm import LLM, CompletionOutput, RequestOutput

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "ThriftyError"]
__getattr__ = exports(
    globals(),
    {
        "LLM": "thrifty.llm",
        "CompletionOutput": "thrifty.llm",
        "RequestOutput": "thrifty.llm",
        "SamplingParams": "thrifty.engine.sampling_params",
    },
)
