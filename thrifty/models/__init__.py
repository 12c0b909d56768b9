"""Model families, looked up by the checkpoint's architecture name."""

from torch import nn

from thrifty.config import ModelConfig
from thrifty.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    return MODEL_CLASSES[cfg.architecture]
