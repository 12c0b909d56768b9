"""Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434) over a compressed paged cache.

Each token caches one vector per layer: its normalised kv latent `c` (kv_lora_rank) followed by its
rotated rope key `k_pe` (qk_rope_head_dim), shared by every head. Per head, keys and values are
`kv_b_proj` applied to `c`:  k_nope_h = W_uk_h c,  v_h = W_uv_h c.

- Prefill (several new tokens per sequence) expands the cached latents into per-head keys and
  values and runs ordinary attention: cheapest when many queries share the expansion.
- Decode (one new token per sequence) uses the weight-absorbed form: q_nope_h . W_uk_h c =
  (W_uk_h^T q_nope_h) . c, and sum_t p_t W_uv_h c_t = W_uv_h (sum_t p_t c_t). Every head then
  attends straight over the cached latents, as multi-query attention with one shared key of
  width kv_lora_rank + qk_rope_head_dim whose first kv_lora_rank dims are also the value.
Both forms compute the same function; tests hold their logits to transformers' within 1e-4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thrifty import distributed, kernels
from thrifty.config import ModelConfig
from thrifty.distributed import Shard
from thrifty.models.attention import get_context
from thrifty.models.layers import Linear, Module, RMSNorm, RotaryEmbedding, yarn_mscale
from thrifty.models.parallel import ColumnParallelLinear, RowParallelLinear

# DeepSeek's reference code (and transformers) build the two low-rank norms with the RMSNorm
# default, not the config's rms_norm_eps.
LORA_NORM_EPS = 1e-6


class KVUpProjection(Module):
    """kv_b_proj: latent -> per-head k_nope and v. The absorbed form reads its weight as per-head
    matrices, so it keeps the checkpoint's layout (it is not a Linear, which may be packed).
    Under tensor parallelism it keeps its rank's heads, as q_b_proj does."""

    def __init__(self, in_features: int, out_features: int, head_rows: int):
        super().__init__()
        self.shard = Shard(0, (out_features,), (head_rows,))
        self.weight = nn.Parameter(torch.empty(self.shard.local, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class MLAttention(Module):
    """Under tensor parallelism each rank runs its own heads; the latent (kv_a_proj_with_mqa)
    is computed, and cached, whole on every rank, since every head reads all of it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.mla
        assert m is not None
        h = cfg.num_heads
        self.num_heads = distributed.chunk(h, distributed.world_size(), distributed.rank())[1]
        self.kv_lora_rank, self.nope, self.rope_dim, self.v_dim = (
            m.kv_lora_rank,
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
        )
        self.q_lora_rank = m.q_lora_rank
        self.rope_interleave = m.rope_interleave
        if m.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(
                cfg.hidden_size, [h * m.qk_head_dim], units=[m.qk_head_dim]
            )
        else:
            self.q_a_proj = Linear(cfg.hidden_size, m.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(
                m.q_lora_rank, [h * m.qk_head_dim], units=[m.qk_head_dim]
            )
        self.kv_a_proj_with_mqa = Linear(
            cfg.hidden_size, m.kv_lora_rank + m.qk_rope_head_dim, bias=cfg.qkv_bias
        )
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LORA_NORM_EPS)
        kv_head = m.qk_nope_head_dim + m.v_head_dim
        self.kv_b_proj = KVUpProjection(m.kv_lora_rank, h * kv_head, kv_head)
        self.o_proj = RowParallelLinear(
            h * m.v_head_dim, cfg.hidden_size, bias=cfg.qkv_bias, unit=m.v_head_dim
        )
        # YaRN's softmax correction (DeepSeek's mscale): the logits grow by mscale^2.
        self.scale = m.qk_head_dim**-0.5
        rope = cfg.rope
        if rope.type != "default" and rope.mscale_all_dim:
            self.scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
        # Per sequence, expanding costs Tk * R * H * (Dnope + Dv) multiply-adds once, and the
        # absorbed form Tq * Tk * H * 2 * (R + Drope) more than the expanded attention: absorb
        # while Tq stays below their ratio (decode, speculative verification, short chunks).
        e = m.kv_lora_rank + m.qk_rope_head_dim
        self.max_absorbed_queries = max(
            1, m.kv_lora_rank * (m.qk_nope_head_dim + m.v_head_dim) // (2 * e)
        )
        # Set by the model runner: (num_blocks, block_size, kv_lora_rank + qk_rope_head_dim).
        self.kv_cache = torch.empty(0)

    def _rotate(self, x: torch.Tensor, rope: RotaryEmbedding, cos_sin) -> torch.Tensor:
        if self.rope_interleave:
            # Pairs (x0, x1), (x2, x3)... -> halves: the same rotation in rotate-half layout.
            # q and k are permuted alike, so their dot products are unchanged.
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return rope.rotate(x, *cos_sin)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cos_sin) -> torch.Tensor:
        n, h = x.shape[0], self.num_heads
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(n, h, self.nope + self.rope_dim)  # (N, H, Dnope + Drope)
        q_nope, q_pe = q[..., : self.nope], self._rotate(q[..., self.nope :], rope, cos_sin)
        kv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(kv[:, : self.kv_lora_rank])  # (N, R)
        k_pe = self._rotate(kv[:, None, self.kv_lora_rank :], rope, cos_sin)[:, 0]  # (N, Drope)

        meta = get_context()
        cache = self.kv_cache.view(-1, self.kv_lora_rank + self.rope_dim)
        cache.index_copy_(0, meta.slot_mapping, torch.cat((latent, k_pe), dim=-1))
        if meta.parts:  # decoding rows and prompt chunks, each in its own layout
            out = q_nope.new_empty(n, h * self.v_dim)
            for rows, part in meta.parts:
                out[rows] = self._attend(q_nope[rows], q_pe[rows], cache, part)
        else:
            out = self._attend(q_nope, q_pe, cache, meta)
        return self.o_proj(out)

    def _attend(self, q_nope, q_pe, cache, meta) -> torch.Tensor:
        if meta.max_query_len <= self.max_absorbed_queries:
            return self._absorbed(q_nope, q_pe, cache, meta)
        return self._expanded(q_nope, q_pe, cache[meta.key_slots], meta)

    def _w_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope], w[:, self.nope :]  # (H, Dnope, R), (H, Dv, R)

    def _absorbed(self, q_nope, q_pe, cache, meta) -> torch.Tensor:
        """Attend straight over the latents. q_*: (N, H, .); cache: (slots, R + Drope)."""
        w_uk, w_uv = self._w_kv_b()
        q_latent = torch.einsum("nhd,hdr->nhr", q_nope, w_uk)  # (N, H, R)
        q_full = torch.cat((q_latent, q_pe), dim=-1)  # (N, H, E), E = R + Drope
        if meta.block_tables is not None and q_full.dtype in (torch.float32, torch.bfloat16):
            # Decode with the compiled paged kernel, as multi-query attention with one KV head
            # whose value is the whole entry; the rope tail of its output is dropped.
            entries = self.kv_cache.unsqueeze(2)  # (blocks, block_size, 1, E)
            out = kernels.paged_decode_attention(
                q_full, entries, entries, meta.block_tables, meta.context_lens, self.scale
            ).view(*q_full.shape)
        elif meta.max_query_len == 1:
            out = latent_decode_attention(q_full, cache[meta.key_slots], meta.attn_mask, self.scale)
        else:
            entries = cache[meta.key_slots][:, None]  # (B, 1, Tk, E): one shared KV head
            out = F.scaled_dot_product_attention(
                _pad_queries(q_full, meta).transpose(1, 2),  # (B, H, Tq, E)
                entries,
                entries,
                attn_mask=meta.attn_mask,
                is_causal=meta.causal,
                scale=self.scale,
                enable_gqa=True,
            )
            out = _unpad(out.transpose(1, 2), meta)  # (N, H, E)
        out = torch.einsum("nhr,hvr->nhv", out[..., : self.kv_lora_rank], w_uv)  # (N, H, Dv)
        return out.reshape(out.shape[0], -1)

    def _expanded(self, q_nope, q_pe, entries, meta) -> torch.Tensor:
        """Several queries per sequence: expand the latents into per-head keys and values."""
        b, tk, h = meta.batch_size, entries.shape[1], self.num_heads
        kv = self.kv_b_proj(entries[..., : self.kv_lora_rank]).view(b, tk, h, -1)
        keys = torch.cat(
            (kv[..., : self.nope], entries[:, :, None, self.kv_lora_rank :].expand(b, tk, h, -1)),
            dim=-1,
        ).transpose(1, 2)  # (B, H, Tk, Dnope + Drope)
        values = kv[..., self.nope :].transpose(1, 2)  # (B, H, Tk, Dv)
        q = torch.cat((q_nope, q_pe), dim=-1)  # (N, H, Dq)
        out = F.scaled_dot_product_attention(
            _pad_queries(q, meta).transpose(1, 2),  # (B, H, Tq, Dq)
            keys,
            values,
            attn_mask=meta.attn_mask,
            is_causal=meta.causal,
            scale=self.scale,
        )
        return _unpad(out.transpose(1, 2), meta).reshape(-1, h * self.v_dim)


def _pad_queries(q: torch.Tensor, meta) -> torch.Tensor:
    """(N, H, D) new tokens -> (B, Tq, H, D), each sequence's queries padded to the longest."""
    b, tq = meta.batch_size, meta.max_query_len
    if meta.query_index is None:
        return q.view(b, tq, *q.shape[1:])
    padded = q.new_zeros(b * tq, *q.shape[1:]).index_copy_(0, meta.query_index, q)
    return padded.view(b, tq, *q.shape[1:])


def _unpad(out: torch.Tensor, meta) -> torch.Tensor:
    """(B, Tq, H, D) -> (N, H, D): the rows of the real queries."""
    out = out.reshape(-1, *out.shape[2:])
    return out if meta.query_index is None else out[meta.query_index]


def latent_decode_attention(
    q: torch.Tensor, entries: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Pure torch: one query per sequence over its latent entries, each entry key and value.

    q: (B, H, E); entries: (B, Tk, E); mask: (B, 1, 1, Tk) or None. Returns (B, H, E).
    """
    scores = torch.matmul(q, entries.transpose(1, 2)).float() * scale  # (B, H, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, 0], float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(entries.dtype), entries)
