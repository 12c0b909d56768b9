"""DeepSeek-V3 and DeepSeek-V2 in one family: latent attention, mixture of experts, MTP.

- Attention is multi-head latent attention (`mla.py`): the paged cache keeps one latent plus one
  rope key per token and layer.
- The first `first_k_dense_replace` layers have a dense SwiGLU MLP, later ones (every
  `moe_layer_freq`-th) a mixture of experts (`moe.py`). V2 and V3 differ only in routing flags.
- Multi-token prediction (DeepSeek-V3, arXiv:2412.19437 section 2.2): the checkpoint's layers
  after the last main one (`model.layers.{num_layers + i}`) each hold one more decoder block that
  reads the main model's final hidden state at position t and the embedding of token t + 1, and
  predicts token t + 2 with the shared head. The engine uses it as a draft for speculative
  decoding (`engine/spec_decode.py`); a checkpoint without those tensors loads without it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from thrifty.config import ModelConfig
from thrifty.models.layers import Linear, Module, RMSNorm, RotaryEmbedding
from thrifty.models.mla import MLAttention
from thrifty.models.moe import Expert, MoE
from thrifty.models.parallel import ParallelLMHead, VocabParallelEmbedding


class DecoderLayer(Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.moe is not None and cfg.moe.is_moe_layer(index):
            self.mlp: nn.Module = MoE(cfg.hidden_size, cfg.moe)
        else:
            self.mlp = Expert(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cos_sin) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cos_sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(Module):
    """The MTP layer's own final norm; its head is the main model's `lm_head`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """h'_t = eh_proj([enorm(emb(x_{t+1})), hnorm(h_t)]) -> a decoder block -> shared_head.norm."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__(cfg, index)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.shared_head = SharedHead(cfg)

    def predict(
        self, embeds: torch.Tensor, hidden: torch.Tensor, rope: RotaryEmbedding, cos_sin
    ) -> torch.Tensor:
        x = self.eh_proj(torch.cat((self.enorm(embeds), self.hnorm(hidden)), dim=-1))
        return self.shared_head.norm(self(x, rope, cos_sin))


class DeepseekModel(Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        n = cfg.num_layers
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, i) for i in range(n)]
            + [MTPLayer(cfg, n + i) for i in range(cfg.num_mtp_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3ForCausalLM(Module):
    """Also DeepseekV2ForCausalLM: the differences are flags in ModelConfig.mla / .moe."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.mla is not None
        self.config = cfg
        self.num_layers = cfg.num_layers
        self.model = DeepseekModel(cfg)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary_emb = RotaryEmbedding(
            cfg.rope, cfg.mla.qk_rope_head_dim, cfg.max_position_embeddings
        )

    # -- the contract with the loader and the model runner --

    # Linear weights may take the packed CPU layout at load (see pack_linears); the router and
    # kv_b_proj, read directly, are not Linears.
    packs_weights = True

    def packed_modules(self) -> dict[str, list[tuple[str, int | None]]]:
        """Merged parameters: target suffix -> [(checkpoint suffix, rows)]; None: equal halves."""
        return {"gate_up_proj": [("gate_proj", None), ("up_proj", None)]}

    @property
    def ignored_checkpoint_suffixes(self) -> tuple[str, ...]:
        """Copies of the main embedding and head that DeepSeek-V3 stores in each MTP layer."""
        return tuple(
            f"model.layers.{i}.{name}"
            for i in range(self.num_layers, self.num_layers + self.config.num_mtp_layers)
            for name in ("embed_tokens.weight", "shared_head.head.weight")
        )

    # Routing is chosen in float32, as the checkpoint stores it.
    float32_param_suffixes = ("e_score_correction_bias",)

    def optional_modules(self) -> dict[str, Callable[[], None]]:
        """Module prefixes a checkpoint may leave out entirely, and how to drop them then."""
        return {
            f"model.layers.{i}.": self.drop_mtp
            for i in range(self.num_layers, len(self.model.layers))
        }

    def drop_mtp(self) -> None:
        del self.model.layers[self.num_layers :]

    @property
    def num_mtp_layers(self) -> int:
        return len(self.model.layers) - self.num_layers

    def kv_cache_layout(self) -> tuple[int, ...]:
        """(cached layers, per-token shape): one latent + rope key per layer, MTP layers too."""
        m = self.config.mla
        return (len(self.model.layers), m.kv_lora_rank + m.qk_rope_head_dim)

    def attach_kv_cache(self, cache: torch.Tensor) -> None:
        """cache: (layers, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim)."""
        for layer, layer_cache in zip(self.model.layers, cache, strict=True):
            layer.self_attn.kv_cache = layer_cache
        # An MTP entry can be read before it is written (a prefix-cache hit whose last entry
        # waited on the next token): zeros only weaken a draft, where garbage could be NaN.
        cache[self.num_layers :].zero_()

    # -- forward --

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states (N, hidden), after the final norm, for the N new tokens of the batch."""
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.rotary_emb.cos_sin(positions, x.dtype)
        for layer in self.model.layers[: self.num_layers]:
            x = layer(x, self.rotary_emb, cos_sin)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def mtp_forward(
        self,
        next_ids: torch.Tensor,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        depth: int = 0,
    ) -> torch.Tensor:
        """MTP layer `depth` at positions t: h_t and token x_{t+1} -> a hidden predicting x_{t+2}.

        Reads and writes that layer's own cache at the positions of the forward context.
        """
        layer = self.model.layers[self.num_layers + depth]
        cos_sin = self.rotary_emb.cos_sin(positions, hidden.dtype)
        return layer.predict(self.model.embed_tokens(next_ids), hidden, self.rotary_emb, cos_sin)
