"""Model families, looked up by the checkpoint's architecture name."""

from torch import nn

from thrifty.config import ModelConfig
from thrifty.models.deepseek_v3 import DeepseekV3ForCausalLM
from thrifty.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV3ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    return MODEL_CLASSES[cfg.architecture]
