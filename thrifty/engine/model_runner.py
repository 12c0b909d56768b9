"""Owns the tensors: the model, the KV cache, and turning a scheduled batch into sampled tokens."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from thrifty import distributed
from thrifty.config import EngineConfig, ModelConfig
from thrifty.engine.block_manager import NULL_BLOCK
from thrifty.engine.sampler import Sampler
from thrifty.engine.sequence import Sequence, TokenLogprob
from thrifty.errors import ThriftyError
from thrifty.models.attention import build_metadata, forward_context


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, model: nn.Module | None = None) -> int:
    """K and V for every layer: 2 * layers * kv_heads * head_dim * element size.

    A model that declares its own cache layout (`kv_cache_layout()`: cached layers, then the
    per-token shape; DeepSeek's latent attention keeps one latent + rope key) takes that size.
    """
    if model is not None and hasattr(model, "kv_cache_layout"):
        return math.prod(model.kv_cache_layout()) * dtype.itemsize
    if cfg.mla is not None:  # before the model exists: the main layers' latents, no MTP layers
        return cfg.num_layers * (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) * dtype.itemsize
    return 2 * cfg.num_layers * local_kv_heads(cfg) * cfg.head_dim * dtype.itemsize


def local_kv_heads(cfg: ModelConfig) -> int:
    """KV heads cached on this rank: its share under tensor parallelism, at least one."""
    return distributed.local_kv_heads(cfg.num_heads, cfg.num_kv_heads)


def num_kv_blocks(config: EngineConfig, bytes_per_token: int) -> int:
    """KV-cache blocks: --num-kv-blocks, else as many as --kv-cache-memory-bytes holds."""
    block_bytes = bytes_per_token * config.block_size
    return config.num_kv_blocks or max(config.kv_cache_memory_bytes // block_bytes, 1)


def check_kv_cache_fits(config: EngineConfig, bytes_per_token: int) -> None:
    """Refuse, before anything is loaded, a KV cache larger than the device's whole memory."""
    need = num_kv_blocks(config, bytes_per_token) * config.block_size * bytes_per_token
    have = device_memory_bytes(config.device)
    if have is not None and need > have:
        raise ThriftyError(
            f"the KV cache would take {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} "
            f"GiB of memory of {config.device!r}; lower --kv-cache-memory-bytes or --num-kv-blocks"
        )


def device_memory_bytes(device: str) -> int | None:
    """The total memory of a CPU (physical RAM) or CUDA device; None where unknown."""
    kind = torch.device(device).type
    if kind == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    if kind == "cuda":
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return None


@dataclass
class ForwardBatch:
    """The flat inputs of one forward pass: each sequence adds a run of its tokens at their
    positions, and the batch's attention layout follows from those runs."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    tables: list[list[int]] = field(default_factory=list)

    def add(self, seq: Sequence, start: int, tokens: list[int]) -> int:
        """`tokens` at positions start, start + 1, ... of `seq`; returns their first row."""
        first = len(self.ids)
        self.ids += tokens
        self.positions += range(start, start + len(tokens))
        self.query_lens.append(len(tokens))
        self.context_lens.append(start + len(tokens))
        self.tables.append(seq.block_table)
        return first

    def run(
        self, forward: Callable[..., torch.Tensor], block_size: int, device: torch.device, *extra
    ) -> torch.Tensor:
        """forward(input_ids, positions, *extra) in this batch's attention context."""
        meta = build_metadata(self.query_lens, self.context_lens, self.tables, block_size, device)
        ids = torch.tensor(self.ids, dtype=torch.long, device=device)
        pos = torch.tensor(self.positions, dtype=torch.long, device=device)
        with forward_context(meta):
            return forward(ids, pos, *extra)


class ModelRunner:
    def __init__(self, model: nn.Module, cfg: ModelConfig, config: EngineConfig):
        self.model = model
        self.cfg = cfg
        self.config = config
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        bytes_per_token = kv_bytes_per_token(cfg, config.cache_dtype, model)
        check_kv_cache_fits(config, bytes_per_token)
        self.num_blocks = num_kv_blocks(config, bytes_per_token)
        if hasattr(model, "kv_cache_layout"):
            # The model's own layout: (layer, block, slot, *per-token shape), a view per layer.
            if config.cache_dtype != config.dtype:
                raise ThriftyError(
                    f"--kv-cache-dtype {str(config.cache_dtype).removeprefix('torch.')}: "
                    f"{type(model).__name__}'s latent cache takes the activations' dtype only"
                )
            layers, *per_token = model.kv_cache_layout()
            shape = (layers, self.num_blocks, config.block_size, *per_token)
            self.kv_cache = torch.empty(shape, dtype=config.dtype, device=self.device)
            self.kv_cache[:, NULL_BLOCK].zero_()
            model.attach_kv_cache(self.kv_cache)
        else:
            self._allocate_kv_heads(model, cfg, config)
        self.sampler = Sampler()
        self.parallel = distributed.world_size() > 1
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
            local_kv_heads(cfg),
            cfg.head_dim,
            dtype=config.cache_dtype,
            device=self.device,
        )
        self.kv_cache[:, :, NULL_BLOCK].zero_()
        for i, attn in enumerate(model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    def count(self, seq: Sequence, start: int, n: int) -> None:
        """Tally n tokens computed from `start`: prompt tokens (prefill) or decoded ones."""
        if start < seq.num_prompt_tokens:
            self.num_prefill_tokens += min(n, seq.num_prompt_tokens - start)
        else:
            self.num_decode_tokens += n

    @torch.inference_mode()
    def step(
        self, batch: list[tuple[Sequence, int]]
    ) -> tuple[list[Sequence], list[int], list[TokenLogprob | None]]:
        """Run one forward pass; sample for the sequences whose new tokens reach their end.

        Returns those sequences with their sampled tokens (and logprobs where asked for).
        """
        fwd = ForwardBatch()
        sample_rows, sample_seqs = [], []
        for seq, n in batch:
            start = seq.num_computed_tokens
            first = fwd.add(seq, start, seq.token_ids[start : start + n])
            if start + n == seq.num_tokens:
                sample_rows.append(first + n - 1)
                sample_seqs.append(seq)
            self.count(seq, start, n)
        if self.parallel:  # the other ranks run the same forward on their shards
            distributed.broadcast_step((fwd, sample_rows))
        logits = self.logits(fwd, sample_rows)
        if logits is None:
            return [], [], []
        tokens, logprobs = self.sampler(logits, sample_seqs)
        return sample_seqs, tokens, logprobs

    def logits(self, fwd: ForwardBatch, sample_rows: list[int]) -> torch.Tensor | None:
        """The forward pass of `fwd`, then the logits (rows, vocab) of `sample_rows`."""
        hidden = fwd.run(self.model, self.block_size, self.device)
        if not sample_rows:
            return None
        if len(sample_rows) != hidden.shape[0]:
            hidden = hidden[torch.tensor(sample_rows, device=self.device)]
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def follow(self) -> None:
        """Ranks > 0: run each step rank 0 broadcasts, until it broadcasts None."""
        while (step := distributed.receive_step()) is not None:
            self.logits(*step)
