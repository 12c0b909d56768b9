"""Owns the tensors: the model, the KV cache, and turning a scheduled batch into sampled tokens."""

from __future__ import annotations

import math

import torch
from torch import nn

from thrifty.config import EngineConfig, ModelConfig
from thrifty.engine.block_manager import NULL_BLOCK
from thrifty.engine.sampler import Sampler
from thrifty.engine.sequence import Sequence, TokenLogprob
from thrifty.models.attention import build_metadata, forward_context


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, model: nn.Module | None = None) -> int:
    """K and V for every layer: 2 * layers * kv_heads * head_dim * element size.

    A model that declares its own cache layout (`kv_cache_layout()`: cached layers, then the
    per-token shape; DeepSeek's latent attention keeps one latent + rope key) takes that size.
    """
    if model is not None and hasattr(model, "kv_cache_layout"):
        return math.prod(model.kv_cache_layout()) * dtype.itemsize
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(self, model: nn.Module, cfg: ModelConfig, config: EngineConfig):
        self.model = model
        self.cfg = cfg
        self.config = config
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        block_bytes = kv_bytes_per_token(cfg, config.dtype, model) * config.block_size
        self.num_blocks = config.num_kv_blocks or max(
            config.kv_cache_memory_bytes // block_bytes, 1
        )
        if hasattr(model, "kv_cache_layout"):
            # The model's own layout: (layer, block, slot, *per-token shape), a view per layer.
            layers, *per_token = model.kv_cache_layout()
            shape = (layers, self.num_blocks, config.block_size, *per_token)
            self.kv_cache = torch.empty(shape, dtype=config.dtype, device=self.device)
            self.kv_cache[:, NULL_BLOCK].zero_()
            model.attach_kv_cache(self.kv_cache)
        else:
            self._allocate_kv_heads(model, cfg, config)
        self.sampler = Sampler()
        self.num_prefill_tokens = 0  # prompt tokens computed (not served from the prefix cache)
        self.num_decode_tokens = 0

    def _allocate_kv_heads(self, model: nn.Module, cfg: ModelConfig, config: EngineConfig) -> None:
        # (K/V, layer, block, slot, kv head, head dim): one allocation, a view per layer. Left
        # uninitialised (zeroing a large cache costs seconds of page faults): attention reads
        # only slots written this or an earlier step, and block 0, the zeroed null block that
        # padding points to.
        self.kv_cache = torch.empty(
            2,
            cfg.num_layers,
            self.num_blocks,
            config.block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            dtype=config.dtype,
            device=self.device,
        )
        self.kv_cache[:, :, NULL_BLOCK].zero_()
        for i, attn in enumerate(model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    @torch.inference_mode()
    def step(
        self, batch: list[tuple[Sequence, int]]
    ) -> tuple[list[Sequence], list[int], list[TokenLogprob | None]]:
        """Run one forward pass; sample for the sequences whose new tokens reach their end.

        Returns those sequences with their sampled tokens (and logprobs where asked for).
        """
        ids, positions, query_lens, context_lens, tables = [], [], [], [], []
        sample_rows, sample_seqs = [], []
        row = 0
        for seq, n in batch:
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(seq.block_table)
            row += n
            if start + n == seq.num_tokens:
                sample_rows.append(row - 1)
                sample_seqs.append(seq)
            if start < seq.num_prompt_tokens:
                self.num_prefill_tokens += min(n, seq.num_prompt_tokens - start)
            else:
                self.num_decode_tokens += n
        meta = build_metadata(query_lens, context_lens, tables, self.block_size, self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        with forward_context(meta):
            hidden = self.model(input_ids, pos)
        if not sample_seqs:
            return [], [], []
        if len(sample_rows) != hidden.shape[0]:
            hidden = hidden[torch.tensor(sample_rows, device=self.device)]
        logits = self.model.compute_logits(hidden)
        tokens, logprobs = self.sampler(logits, sample_seqs)
        return sample_seqs, tokens, logprobs
