"""The compiled CPU ops (paged decode attention, RMSNorm) against their pure-torch references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty import kernels

# (activations, KV cache) dtypes the attention ops take: kernels.takes_cache
KV_PAIRS = [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float32, torch.bfloat16)]


def test_kernel_builds_here():
    # This machine has a compiler and ninja: a silent fallback would hide a broken build.
    assert kernels.cpu_ops_available()


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 6),
    kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 3, 7]),
    head_dim=st.sampled_from([8, 64, 80, 128]),
    block_size=st.sampled_from([1, 4, 16]),
    dtypes=st.sampled_from(KV_PAIRS),
    data=st.data(),
)
def test_matches_reference(batch, kv_heads, group, head_dim, block_size, dtypes, data):
    seed = data.draw(st.integers(0, 2**16))
    # Up to 100 tokens: several of the kernels' 8-token key and 32-token value passes, and tails.
    lens = [data.draw(st.integers(1, 100)) for _ in range(batch)]
    q, k_cache, v_cache, tables, context_lens, scale = _attention_case(
        lens, kv_heads, group, head_dim, block_size, dtypes, seed
    )
    got = kernels.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale)
    want = kernels.reference_paged_decode_attention(
        q, k_cache, v_cache, tables, context_lens, scale
    )
    assert got.dtype == dtypes[0] == want.dtype
    tol = 1e-5 if dtypes[0] == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def _attention_case(lens, kv_heads, group, head_dim, block_size, dtypes, seed):
    """q, the caches, block tables, context lengths and scale of sequences of `lens` tokens."""
    dtype, cache_dtype = dtypes
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in lens)
    num_blocks = len(lens) * max_blocks + 1
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(cache_dtype)
    v_cache = torch.randn(shape, generator=g).to(cache_dtype)
    q = torch.randn(len(lens), kv_heads * group, head_dim, generator=g).to(dtype)
    # Each sequence gets its own scattered blocks (block 0 stays unused, as in the engine).
    perm = torch.randperm(num_blocks - 1, generator=g) + 1
    tables = perm[: len(lens) * max_blocks].view(len(lens), max_blocks)
    return q, k_cache, v_cache, tables, torch.tensor(lens), head_dim**-0.5


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "lens, kv_heads",
    [([300], 3), ([257], 1), ([1200], 1), ([1, 700, 600], 1), ([700, 2], 3)],
)
@pytest.mark.parametrize("dtypes", KV_PAIRS)
def test_long_contexts_split_over_the_threads_match_the_reference(lens, kv_heads, threads, dtypes):
    # Fewer (sequence, kv head) tasks than 4 a thread that the threads do not divide: each
    # context is cut into a part per thread and the parts' softmaxes merged (csrc/cpu_ops.cpp
    # context_parts). The 1-token sequence leaves one of its parts empty.
    q, k_cache, v_cache, tables, context_lens, scale = _attention_case(
        lens, kv_heads, 2, 64, 16, dtypes, seed=sum(lens) + kv_heads
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernels.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale)
    finally:
        torch.set_num_threads(before)
    want = kernels.reference_paged_decode_attention(
        q, k_cache, v_cache, tables, context_lens, scale
    )
    tol = 1e-5 if dtypes[0] == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 40),
    dim=st.sampled_from([1, 7, 64, 576, 896]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_matches_reference(rows, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
    w = torch.randn(dim, generator=g).to(dtype)
    got = kernels.rms_norm(x, w, 1e-5)
    want = kernels.reference_rms_norm(x, w, 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 40),
    dim=st.sampled_from([8, 576, 896, 1000]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_add_rms_norm_updates_the_residual_like_the_unfused_ops(rows, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
    residual = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
    w = torch.randn(dim, generator=g).to(dtype)
    want_residual = residual + x  # what the layer computed before the fused op
    want = kernels.reference_rms_norm(want_residual, w, 1e-5)
    ref_residual = residual.clone()
    assert torch.equal(kernels.reference_add_rms_norm(x, ref_residual, w, 1e-5), want)
    got = kernels.add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(residual, want_residual) and torch.equal(ref_residual, want_residual)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@settings(max_examples=20, deadline=None)
@given(
    tokens=st.integers(1, 40),
    kv_heads=st.sampled_from([1, 3]),
    head_dim=st.sampled_from([8, 64]),
    dtypes=st.sampled_from(KV_PAIRS),
    seed=st.integers(0, 2**16),
)
def test_store_kv_matches_reference(tokens, kv_heads, head_dim, dtypes, seed):
    # Under float32 activations a bfloat16 cache gets k and v rounded to it, as .to() rounds.
    dtype, cache_dtype = dtypes
    g = torch.Generator().manual_seed(seed)
    shape = (8, 16, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(cache_dtype)
    v_cache = torch.randn(shape).to(cache_dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(8 * 16, generator=g)[:tokens]
    k = torch.randn(tokens, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(tokens, kv_heads, head_dim, generator=g).to(dtype)
    kernels.store_kv(k, v, k_cache, v_cache, slots)
    kernels.reference_store_kv(k, v, want_k, want_v, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_store_kv_refuses_a_slot_outside_the_cache():
    cache = torch.zeros(2, 4, 1, 8)
    k = torch.ones(1, 1, 8)
    try:
        kernels.store_kv(k, k, cache, cache.clone(), torch.tensor([8]))
    except RuntimeError as e:
        assert "slot out of range" in str(e)
    else:
        raise AssertionError("an out-of-range slot was written")


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 33),
    half=st.sampled_from([1, 15, 16, 17, 1536]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_silu_and_mul_matches_reference(rows, half, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, 2 * half, generator=g) * 4).to(dtype)
    got = kernels.silu_and_mul(x)
    want = kernels.reference_silu_and_mul(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 9),
    heads=st.integers(1, 5),
    dims=st.sampled_from([(64, 64), (128, 128), (64, 32), (2, 2)]),  # (head_dim, rotary dims)
    pad=st.integers(0, 40),  # the heads are a view with a wider row (a fused qkv output)
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_rope_matches_reference(rows, heads, dims, pad, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    d, r = dims
    wide = torch.randn(rows, heads * d + pad, generator=g).to(dtype)
    x = wide[:, : heads * d].view(rows, heads, d)
    angles = torch.rand(rows, 1, r // 2, generator=g) * 100
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    got = kernels.rope(x, cos, sin)
    assert got.shape == x.shape and got.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, kernels.reference_rope(x, cos, sin), atol=tol, rtol=tol)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 9),
    heads=st.sampled_from([(1, 1), (3, 1), (9, 3), (14, 2)]),  # (query heads, KV heads)
    dims=st.sampled_from([(64, 64), (128, 128), (64, 32), (2, 2)]),  # (head_dim, rotary dims)
    pad=st.integers(0, 40),  # qkv may be a view with a wider row
    dtypes=st.sampled_from(KV_PAIRS),
    seed=st.integers(0, 2**16),
)
def test_rope_store_kv_matches_rope_then_store(rows, heads, dims, pad, dtypes, seed):
    dtype, cache_dtype = dtypes
    g = torch.Generator().manual_seed(seed)
    (h, hkv), (d, r) = heads, dims
    wide = torch.randn(rows, (h + 2 * hkv) * d + pad, generator=g).to(dtype)
    qkv = wide[:, : (h + 2 * hkv) * d]
    angles = torch.rand(rows, 1, r // 2, generator=g) * 100
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    k_cache = torch.randn(4, 8, hkv, d, generator=g).to(cache_dtype)
    v_cache = torch.randn(4, 8, hkv, d, generator=g).to(cache_dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(32, generator=g)[:rows]
    q = kernels.rope_store_kv(qkv, cos, sin, k_cache, v_cache, slots, h, hkv)
    want_q = kernels.reference_rope_store_kv(qkv, cos, sin, want_k, want_v, slots, h, hkv)
    assert q.shape == (rows, h, d) and q.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q, want_q, atol=tol, rtol=tol)
    # Keys rotated in float32, each rounded once to the cache's dtype (one ulp apart at most).
    ktol = 1e-5 if cache_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(k_cache, want_k, atol=ktol, rtol=ktol)
    assert torch.equal(v_cache, want_v)  # values are copied (or rounded as .to() rounds)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(k_cache.view(32, hkv, d)[untouched], want_k.view(32, hkv, d)[untouched])


def test_rope_store_kv_refuses_a_slot_outside_the_cache():
    qkv, angles = torch.ones(1, 3 * 8), torch.zeros(1, 1, 4)
    cache = torch.zeros(2, 4, 1, 8)
    try:
        kernels.rope_store_kv(qkv, angles.cos(), angles.sin(), cache, cache.clone(),
                              torch.tensor([8]), 1, 1)  # fmt: skip
    except RuntimeError as e:
        assert "slot out of range" in str(e)
    else:
        raise AssertionError("an out-of-range slot was written")


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 33),
    vocab=st.integers(1, 3000),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_argmax_matches_torch(rows, vocab, ties, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g)
    if ties:  # integer-valued logits: many rows have several maxima
        x = x.mul(2).round()
    assert torch.equal(kernels.argmax(x), x.argmax(dim=-1))
