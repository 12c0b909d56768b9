"""thrifty: run open-weight LLMs on the hardware you have."""

from thrifty.engine.sampling_params import SamplingParams
from thrifty.errors import ThriftyError
from thrifty.llm import LLM, CompletionOutput, RequestOutput

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "ThriftyError"]
