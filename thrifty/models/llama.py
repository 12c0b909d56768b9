"""Llama, Qwen2 and Qwen3 in one family: GQA, RoPE, SwiGLU MLP, RMSNorm.

Variants are constructor flags read from ModelConfig: Qwen2's q/k/v bias (`qkv_bias`) and Qwen3's
per-head q/k RMSNorm (`qk_norm`). Module names follow the checkpoint's; q/k/v and gate/up are
stored merged (one matmul each), as the loader's `packed_modules` table says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from thrifty.config import ModelConfig
from thrifty.models.attention import paged_attention
from thrifty.models.layers import Embedding, Linear, RMSNorm, RotaryEmbedding, silu_and_mul


@dataclass(frozen=True)
class Rope:
    """The step's rotary angles, computed once and shared by every layer."""

    emb: RotaryEmbedding
    cos: torch.Tensor
    sin: torch.Tensor

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb.rotate(x, self.cos, self.sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        # Set by the model runner once the cache is allocated: (num_blocks, block_size, Hkv, D).
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        n, h, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size :].view(n, hkv, d)  # (N, Hkv, D)
        if self.qk_norm:
            q, k = qkv[:, : self.q_size].view(n, h, d), qkv[:, self.q_size : -self.kv_size]
            q, k = rope.rotate(self.q_norm(q)), rope.rotate(self.k_norm(k.view(n, hkv, d)))
        else:
            # q and k sit side by side in the fused output: rotate them as one (N, H + Hkv, D).
            qk = rope.rotate(qkv[:, : self.q_size + self.kv_size].view(n, h + hkv, d))
            q, k = qk[:, :h], qk[:, h:]
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, self.scale)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Also Qwen2ForCausalLM and Qwen3ForCausalLM: the differences are flags in ModelConfig."""

    packs_weights = True  # every weight goes through linear() or the embedding: see pack_linears

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary_emb = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)

    def packed_modules(self) -> dict[str, list[tuple[str, int]]]:
        """Merged parameters: target suffix -> [(checkpoint suffix, rows along dim 0)]."""
        c = self.config
        q, kv, ffn = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
        return {
            "qkv_proj": [("q_proj", q), ("k_proj", kv), ("v_proj", kv)],
            "gate_up_proj": [("gate_proj", ffn), ("up_proj", ffn)],
        }

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states (N, hidden) for N new tokens of the batch in the forward context."""
        x = self.model.embed_tokens(input_ids)
        rope = Rope(self.rotary_emb, *self.rotary_emb.cos_sin(positions, x.dtype))
        for layer in self.model.layers:
            x = layer(x, rope)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers]
