"""Llama, Qwen2 and Qwen3 in one family: GQA, RoPE, SwiGLU MLP, RMSNorm.

Variants are constructor flags read from ModelConfig: Qwen2's q/k/v bias (`qkv_bias`) and Qwen3's
per-head q/k RMSNorm (`qk_norm`). Module names follow the checkpoint's; q/k/v and gate/up are
stored merged (one matmul each), as the loader's `packed_modules` table says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from thrifty import distributed, kernels
from thrifty.config import ModelConfig
from thrifty.models.attention import attend_cached, get_context, paged_attention
from thrifty.models.layers import (
    Module,
    RMSNorm,
    RotaryEmbedding,
    native_linear,
    silu_and_mul,
)
from thrifty.models.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)

# Whether a decode step loops over the layers in C++ where it can (run_compiled);
# benchmarks/decode_step.py turns it off to time each op from Python.
NATIVE_DECODE = True


@dataclass(frozen=True)
class Rope:
    """The step's rotary angles, computed once and shared by every layer."""

    emb: RotaryEmbedding
    cos: torch.Tensor
    sin: torch.Tensor

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb.rotate(x, self.cos, self.sin)


class Attention(Module):
    """Under tensor parallelism each rank runs its own KV heads and the query heads that read
    them (GQA groups stay whole: 3 KV heads over 2 ranks give 2 and 1), or a share of one
    replicated KV head's queries where the KV heads are fewer than the ranks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kv_replicas = distributed.kv_head_replicas(cfg.num_heads, cfg.num_kv_heads)
        self.head_dim = d = cfg.head_dim
        q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
        group = q // kv_replicas // cfg.num_kv_heads  # the query rows of a rank's one KV head
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size,
            [q, kv, kv],
            bias=cfg.qkv_bias,
            units=[group, d, d],
            replicas=[1, kv_replicas, kv_replicas],
        )
        self.o_proj = RowParallelLinear(q, cfg.hidden_size, bias=cfg.o_bias, unit=group)
        self.q_size, self.kv_size = self.qkv_proj.shard.size(0), self.qkv_proj.shard.size(1)
        self.num_heads, self.num_kv_heads = self.q_size // d, self.kv_size // d
        self.scale = cfg.head_dim**-0.5
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


class MLP(Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ffn = cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [ffn, ffn], bias=cfg.mlp_bias)
        self.down_proj = RowParallelLinear(ffn, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rope: Rope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's attention and MLP outputs are added to the residual stream by the norm
        after each (one pass): returns (this layer's MLP output, the stream before it)."""
        if residual is None:  # the first layer: the stream is the embeddings
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, rope), residual)
        return self.mlp(x), residual


@dataclass(frozen=True, slots=True)
class CompiledLayer:
    """One decoder layer as the compiled CPU ops see it: its weights, bound kernels and cache,
    looked up once. A decode step of SmolLM2 spends about 1.2 ms (of some 9) in Python when it
    walks the modules (attribute lookups, dtype and device checks, a dozen calls a layer);
    `run_compiled` walks these instead (benchmarks/decode_step.py)."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv: Callable[[torch.Tensor], torch.Tensor]
    o: Callable[[torch.Tensor], torch.Tensor]  # all-reduces under tensor parallelism
    gate_up: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor], torch.Tensor]  # all-reduces under tensor parallelism
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    num_heads: int
    num_kv_heads: int
    scale: float

    @staticmethod
    def of(layer: DecoderLayer) -> CompiledLayer:
        attn, mlp = layer.self_attn, layer.mlp
        return CompiledLayer(
            layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
            layer.input_layernorm.eps, attn.qkv_proj.output_fn(), attn.o_proj.output_fn(),
            mlp.gate_up_proj.output_fn(), mlp.down_proj.output_fn(), attn.k_cache, attn.v_cache,
            attn.num_heads, attn.num_kv_heads, attn.scale,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class CompiledLayers:
    """The layers bound for the compiled ops, and the whole decode step's model body bound once
    more in C++ (`native`: csrc/decode_layers.h) where the embedding and every linear have a
    kernel it can call (`Embedding.native_rows`, `layers.native_linear`: GGUF, dense float32)
    and none of them all-reduces."""

    layers: list[CompiledLayer]
    native: object | None  # the compiled ops' DecodeModel
    dtype: torch.dtype  # of the activations they were bound for
    cos: torch.Tensor  # the rotary table they were bound with

    @staticmethod
    def of(model: LlamaForCausalLM, dtype: torch.dtype) -> CompiledLayers:
        body, rotary = model.model, model.rotary_emb
        bound = [CompiledLayer.of(layer) for layer in body.layers]
        embed = body.embed_tokens.native_rows()
        native = None
        if embed is not None:
            norm = body.norm
            native = kernels.cpu_ops().DecodeModel(
                embed, rotary.cos, rotary.sin, norm.weight, norm.eps, dtype
            )
        for layer in bound:
            kernels_ = (layer.qkv, layer.o, layer.gate_up, layer.down)
            linears = [native_linear(f, dtype) for f in kernels_]
            if native is None or any(linear is None for linear in linears):
                native = None
                break
            native.add(layer.input_norm, layer.post_norm, layer.eps, *linears, layer.k_cache,
                       layer.v_cache, layer.num_heads, layer.num_kv_heads, layer.scale)  # fmt: skip
        return CompiledLayers(bound, native, dtype, rotary.cos)


def run_compiled(
    compiled: CompiledLayers, x: torch.Tensor, rope: Rope
) -> tuple[torch.Tensor, torch.Tensor]:
    """DecoderLayer.forward over every layer, in the compiled CPU ops: per layer the residual
    add fused into each norm, q and k rotated and k, v stored in one pass over the fused qkv,
    attention read from the cache. Returns (the last MLP output, the residual stream).

    The C++ loop over the same ops (`compiled.native`) takes the decode steps it can; this one
    takes prefill, mixed steps and the rest."""
    meta = get_context()
    slots = meta.slot_mapping
    # Block tables are set for a step of decodes only (attention.build_metadata), which then
    # reads the cache through them; prefill and mixed steps go the general way (attend_cached).
    decode = meta.block_tables is not None
    ops = kernels.cpu_ops()  # its functions called directly: no wrapper, no lookup a call
    residual = None
    for layer in compiled.layers:
        if residual is None:
            residual, x = x, ops.rms_norm(x, layer.input_norm, layer.eps)
        else:
            x = ops.add_rms_norm(x, residual, layer.input_norm, layer.eps)
        k_cache, v_cache = layer.k_cache, layer.v_cache
        qkv = layer.qkv(x)
        q = ops.rope_store_kv(
            qkv, rope.cos, rope.sin, k_cache, v_cache, slots, layer.num_heads, layer.num_kv_heads
        )
        if decode:
            attn = ops.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.context_lens, layer.scale
            )
        else:
            attn = attend_cached(q, k_cache, v_cache, layer.scale)
        x = ops.add_rms_norm(layer.o(attn), residual, layer.post_norm, layer.eps)
        x = layer.down(ops.silu_and_mul(layer.gate_up(x)))
    return x, residual  # type: ignore[return-value]


class LlamaModel(Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(Module):
    """Also Qwen2ForCausalLM and Qwen3ForCausalLM: the differences are flags in ModelConfig."""

    packs_weights = True  # every weight goes through linear() or the embedding: see pack_linears

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary_emb = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)

    def packed_modules(self) -> dict[str, list[tuple[str, int]]]:
        """Merged parameters: target suffix -> [(checkpoint suffix, rows along dim 0)]: this
        rank's rows under tensor parallelism (the layers' shards say which)."""
        attn, mlp = self.model.layers[0].self_attn, self.model.layers[0].mlp
        q, kv = attn.qkv_proj.shard.size(0), attn.qkv_proj.shard.size(1)
        ffn = mlp.gate_up_proj.shard.size(0)
        return {
            "qkv_proj": [("q_proj", q), ("k_proj", kv), ("v_proj", kv)],
            "gate_up_proj": [("gate_proj", ffn), ("up_proj", ffn)],
        }

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states (N, hidden) for N new tokens of the batch in the forward context."""
        compiled, meta = self.compiled_layers(), get_context()
        # A step of decodes (block tables set) runs the whole body in C++ where it is bound.
        native = None if compiled is None or not NATIVE_DECODE else compiled.native
        if native is not None and meta.block_tables is not None:
            slots, tables, lens = meta.slot_mapping, meta.block_tables, meta.context_lens
            return native.forward(input_ids, positions, slots, tables, lens)
        x = self.model.embed_tokens(input_ids)
        rope = Rope(self.rotary_emb, *self.rotary_emb.cos_sin(positions, x.dtype))
        if compiled is not None:
            x, residual = run_compiled(compiled, x, rope)
        else:
            residual = None
            for layer in self.model.layers:
                x, residual = layer(x, residual, rope)
        return self.model.norm(x, residual)[0]

    def compiled_layers(self) -> CompiledLayers | None:
        """The layers bound for `run_compiled` (and the body for the C++ decode step) where
        the activations and the caches can take the compiled CPU ops (bound again when the KV
        cache, the weights or the rotary table change; Qwen3's q/k norms have no fused op)."""
        embed, first = self.model.embed_tokens, self.model.layers[0].self_attn
        dtype = embed.output_dtype()
        takes = kernels.takes_cache(dtype, first.k_cache.dtype)
        if self.config.qk_norm or not takes or not embed.takes_cpu_ops():
            return None
        bound = self.__dict__.get("_compiled")
        if (
            bound is None
            or bound.dtype != dtype
            or bound.layers[0].k_cache is not first.k_cache
            or bound.layers[0].qkv is not first.qkv_proj.bound_kernel()  # weights set anew since
            or bound.cos is not self.rotary_emb.cos
        ):
            bound = CompiledLayers.of(self, dtype)
            self.__dict__["_compiled"] = bound
        return bound

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers]
