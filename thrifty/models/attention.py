"""Attention over a paged KV cache.

The batch's metadata travels in one scoped context (`forward_context`) set by the model runner, so
that `model(input_ids, positions)` reads like the math. Every step is one varlen batch: each
sequence contributes `query_len` new tokens (a prompt chunk, or one token when decoding) and
attends to all of its `context_len` tokens (those already cached plus the new ones).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from thrifty import kernels


@dataclass
class AttentionMetadata:
    """Per-step batch layout, shared by every layer.

    N new tokens from B sequences, padded to (B, Tq) queries and (B, Tk) keys for SDPA.
    """

    slot_mapping: torch.Tensor  # (N,) flat cache slot of each new token
    attn_mask: torch.Tensor | None  # (B, 1, Tq, Tk) bool; None when no padding is needed
    query_index: (
        torch.Tensor | None
    )  # (N,) row of each new token in the padded (B * Tq); None: decode
    batch_size: int
    max_query_len: int
    causal: bool = False  # one sequence, all of it new: plain causal attention, no mask
    # Decode on the CPU with the compiled kernel: it reads the cache through these directly.
    block_tables: torch.Tensor | None = None  # (B, max_blocks) int64
    context_lens: torch.Tensor | None = None  # (B,) int64
    # A step that mixes decoding sequences with prompt chunks attends in two parts, so that the
    # decoding ones are not padded to the chunk's length: (rows of q, their own layout) each.
    # Attention then reads only the parts (and slot_mapping, to store the new keys): this
    # step's own key_slots, attn_mask and query_index are not a layout to attend with.
    parts: tuple[tuple[torch.Tensor, AttentionMetadata], ...] = ()
    # What `key_slots` is laid out from, on first use: (block tables padded to the longest
    # context, context lengths, block size, device). A decode step on the compiled kernel never
    # asks, and building it was most of this layout's ~0.2 ms a step.
    key_layout: tuple[torch.Tensor, torch.Tensor, int, torch.device] | None = None

    @functools.cached_property
    def key_slots(self) -> torch.Tensor:
        """(B, Tk) flat cache slot of each key, padded with 0."""
        blocks, ctx, block_size, device = self.key_layout  # type: ignore[misc]
        return _key_slots(blocks, ctx, block_size).to(device)


def _key_slots(blocks: torch.Tensor, ctx: torch.Tensor, block_size: int) -> torch.Tensor:
    key_pos = torch.arange(int(ctx.max()))
    key_slots = blocks[:, key_pos // block_size] * block_size + key_pos % block_size  # (B, Tk)
    # Keys past a sequence's end read the null block (slot 0): masked, but never garbage, since
    # 0 * NaN from an uninitialised slot would still poison the output.
    return key_slots.masked_fill(key_pos[None, :] >= ctx[:, None], 0)


_context: ContextVar[AttentionMetadata | None] = ContextVar("thrifty_attention", default=None)


@contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[None]:
    token = _context.set(meta)
    try:
        yield
    finally:
        _context.reset(token)


def get_context() -> AttentionMetadata:
    meta = _context.get()
    if meta is None:
        raise RuntimeError("attention called outside forward_context()")
    return meta


def build_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
    *,
    split: bool = True,
) -> AttentionMetadata:
    """Lay out one step: sequence i computes its last query_lens[i] of context_lens[i] tokens.
    `split=False` pads a mixed step into one batch instead (for comparison and tests)."""
    b = len(query_lens)
    tq, tk = max(query_lens), max(context_lens)
    nblk = (tk + block_size - 1) // block_size
    blocks = torch.tensor([(t[:nblk] + [0] * (nblk - len(t)))[:nblk] for t in block_tables])
    ctx = torch.tensor(context_lens)
    # Each new token's cache slot, read off its block table (a list: one tensor, not a gather
    # per sequence; a decode step's Python time counts against every token).
    slot_mapping = torch.tensor(
        [
            table[p // block_size] * block_size + p % block_size
            for table, n, c in zip(block_tables, query_lens, context_lens, strict=True)
            for p in range(c - n, c)
        ],
        dtype=torch.long,
    )

    to = torch.device(device)
    causal = b == 1 and tq == tk
    parts = ()
    if split and tq > 1 and min(query_lens) == 1:
        # Decoding sequences beside prompt chunks: each part gets its own layout, and the
        # padded one (a (B, 1, Tq, Tk) mask) is never built.
        parts = tuple(_split(query_lens, context_lens, block_tables, block_size, to))
    if parts or causal or (tq == 1 and all(c == tk for c in context_lens)):
        # Split, one whole new sequence, or decode with equal lengths (always so at batch 1):
        # no mask and no padding.
        mask, query_index = None, None
    else:
        key_pos, q_off = torch.arange(tk), torch.arange(tq)
        start = ctx - torch.tensor(query_lens)  # position of each sequence's first new token
        # Padded query rows pretend to be the last token so that no softmax row is empty.
        q_pos = torch.minimum(start[:, None] + q_off, ctx[:, None] - 1)  # (B, Tq)
        mask = (key_pos[None, None, :] <= q_pos[:, :, None]) & (
            key_pos[None, None, :] < ctx[:, None, None]
        )
        mask = mask.unsqueeze(1)  # (B, 1, Tq, Tk)
        query_index = None  # decode: one row per sequence, none padded
        if tq > 1:
            query_index = torch.cat([i * tq + torch.arange(n) for i, n in enumerate(query_lens)])
    decode_kernel = tq == 1 and to.type == "cpu" and kernels.cpu_ops_available()
    return AttentionMetadata(
        slot_mapping=slot_mapping.to(to),
        attn_mask=None if mask is None else mask.to(to),
        query_index=None if query_index is None else query_index.to(to),
        batch_size=b,
        max_query_len=tq,
        causal=causal,
        block_tables=blocks if decode_kernel else None,
        context_lens=ctx if decode_kernel else None,
        parts=parts,
        key_layout=(blocks, ctx, block_size, to),
    )


def _split(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, AttentionMetadata]]:
    """The decoding sequences (one query each) and the prompt chunks, each with its q rows."""
    starts = torch.tensor([0, *query_lens]).cumsum(0).tolist()
    for decoding in (True, False):
        seqs = [i for i, n in enumerate(query_lens) if (n == 1) == decoding]
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in seqs])
        meta = build_metadata(
            [query_lens[i] for i in seqs],
            [context_lens[i] for i in seqs],
            [block_tables[i] for i in seqs],
            block_size,
            device,
        )
        yield rows.to(device), meta


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Store the new k, v in the cache, then attend.

    q: (N, H, D); k, v: (N, Hkv, D); caches: (num_blocks, block_size, Hkv, D). Returns (N, H * D).
    """
    slots = get_context().slot_mapping
    if k.device.type == "cpu" and kernels.cpu_ops_available():
        kernels.store_kv(k, v, k_cache, v_cache, slots)  # index_copy_ is slow here
    else:
        kernels.reference_store_kv(k, v, k_cache, v_cache, slots)
    return attend_cached(q, k_cache, v_cache, scale)


def attend_cached(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attend with the step's keys and values already in the cache: q (N, H, D) -> (N, H * D)."""
    meta = get_context()
    n, h, d = q.shape
    if meta.parts:
        out = q.new_empty(n, h * d)
        for rows, part in meta.parts:
            out[rows] = _attend(q[rows], k_cache, v_cache, part, scale)
        return out
    return _attend(q, k_cache, v_cache, meta, scale)


def _attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of the new tokens q (N, H, D) to their sequences' cached keys and values."""
    _, h, d = q.shape
    hkv = k_cache.shape[2]
    if meta.block_tables is not None and kernels.takes_cache(q.dtype, k_cache.dtype):
        return kernels.paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale
        )
    k_flat, v_flat = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    # (B, Hkv, Tk, D), in q's dtype (a cache in another is converted as it is gathered)
    keys = k_flat[meta.key_slots].transpose(1, 2).to(q.dtype)
    values = v_flat[meta.key_slots].transpose(1, 2).to(q.dtype)
    b, tq = meta.batch_size, meta.max_query_len
    if tq == 1 and b > 1:
        return _decode_attention(q, keys, values, meta.attn_mask, scale)
    if meta.query_index is None:
        queries = q.view(b, tq, h, d)
    else:
        queries = q.new_zeros(b * tq, h, d).index_copy_(0, meta.query_index, q).view(b, tq, h, d)
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2),  # (B, H, Tq, D)
        keys,
        values,
        attn_mask=meta.attn_mask,
        is_causal=meta.causal and tq > 1,
        scale=scale,
        enable_gqa=h != hkv,
    )
    out = out.transpose(1, 2).reshape(b * tq, h * d)  # (B * Tq, H * D)
    return out if meta.query_index is None else out[meta.query_index]


def _decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One query per sequence, several sequences: two batched matmuls.

    On the CPU this doubles SDPA's aggregate throughput at 32 sequences; at one sequence SDPA
    is the faster of the two.

    q: (B, H, D); keys, values: (B, Hkv, Tk, D); mask: (B, 1, 1, Tk) or None. The G = H / Hkv
    query heads that share a KV head are stacked as G rows against it.
    """
    b, h, d = q.shape
    hkv = keys.shape[1]
    qg = q.view(b, hkv, h // hkv, d)  # (B, Hkv, G, D)
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale  # (B, Hkv, G, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(b, h * d)  # (B, H * D)
