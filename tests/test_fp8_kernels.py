"""The compiled FP8 linear (thrifty.kernels.fp8) against the pure-torch reference, shapes from
1x64 to 64x4096x4096, and linear()'s dispatch on the weight's dtype. `fp8_linear` is tested in
the build this CPU runs (AVX-512, or AVX2 + F16C); the packed kernel needs AVX-512 BF16."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from thrifty.kernels import fp8 as fp8_kernels
from thrifty.models.layers import linear
from thrifty.quant import fp8

pytestmark = pytest.mark.skipif(
    not fp8_kernels.available(),
    reason="fp8 kernel needs AVX-512 BF16 + VBMI or AVX2 + FMA + F16C, and a compiler",
)
AVX2 = fp8_kernels.kernel() is fp8_kernels.AVX2_KERNEL


def _tolerance(x, w, y_ref, exact_weights: bool) -> torch.Tensor:
    """Both sides round a float32 result once to x's dtype (they may land one ulp apart); their
    float32 sums differ by at most K * 2^-24 of sum |x * w|. A panel dequantized into bf16 with
    non-power-of-two scales rounds each weight once more (2^-9)."""
    k = x.shape[-1]
    mag = x.float().abs() @ w.abs().T
    ulp = 2**-7 if y_ref.dtype == torch.bfloat16 else 2**-23
    per_weight = 0.0 if exact_weights else 2**-8
    return ulp * y_ref.float().abs() + (k * 2**-24 + per_weight) * mag + 1e-30


def _check(m, n, k, scale_fmt, dtype, bias, rows, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    q, s = fp8.quantize(w, scale_fmt, rows=rows)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    y = fp8_kernels.fp8_linear(x, q, s, rows, b)
    y_ref = fp8.reference_linear(x, q, s, b)
    assert y.dtype == dtype and y.shape == (m, n)
    gemv = m <= fp8_kernels.max_rows() and dtype == torch.bfloat16
    # Only the AVX-512 panel path rounds weights, into bf16 x's dtype (AVX2 dequantizes to float32).
    exact = AVX2 or gemv or scale_fmt == "ue8m0" or dtype == torch.float32
    tol = _tolerance(x, fp8.dequantize(q, s), y_ref, exact)
    err = (y.float() - y_ref.float()).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item()}"


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 64),
    n=st.integers(1, 4096),
    k=st.integers(64, 4096),
    scale_fmt=st.sampled_from(fp8.SCALE_FMTS),
    bias=st.booleans(),
    rows=st.sampled_from(fp8.ROW_BLOCKS),
    seed=st.integers(0, 2**16),
)
@example(m=1, n=1, k=64, scale_fmt="ue8m0", bias=False, rows=128, seed=0)
@example(m=1, n=4096, k=4096, scale_fmt="float", bias=True, rows=128, seed=1)
@example(m=8, n=4096, k=4096, scale_fmt="float", bias=False, rows=128, seed=2)
@example(m=64, n=4096, k=4096, scale_fmt="ue8m0", bias=True, rows=128, seed=3)
@example(m=3, n=130, k=200, scale_fmt="float", bias=True, rows=64, seed=4)  # edge blocks
def test_fast_kernel_matches_reference_bf16(m, n, k, scale_fmt, bias, rows, seed):
    _check(m, n, k, scale_fmt, torch.bfloat16, bias, rows, seed)


@settings(max_examples=8, deadline=None)
@given(
    m=st.integers(1, 64),
    n=st.integers(1, 1024),
    k=st.integers(1, 1024),
    scale_fmt=st.sampled_from(fp8.SCALE_FMTS),
    seed=st.integers(0, 2**16),
)
def test_fast_kernel_matches_reference_fp32(m, n, k, scale_fmt, seed):
    _check(m, n, k, scale_fmt, torch.float32, True, 128, seed)


def test_compiled_dequantize_equals_reference():
    w = torch.randn(300, 333)
    for scale_fmt in fp8.SCALE_FMTS:
        q, s = fp8.quantize(w, scale_fmt)
        assert torch.equal(fp8_kernels.dequantize(q, s, 128, torch.float32), fp8.dequantize(q, s))
        assert torch.equal(
            fp8_kernels.dequantize(q, s, 128, torch.bfloat16),
            fp8.dequantize(q, s, torch.bfloat16),
        )


def test_every_e4m3_byte_decodes_like_torch():
    # All 256 byte values as one row, scale 1: the AVX-512 lookup tables are complete (NaNs
    # included). The AVX2 build's shift-and-mask reads the two NaN bytes as numbers (the loader
    # refuses weights holding them, tests/test_fp8_loading.py); every other byte is exact.
    q = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).view(1, 256)
    s = torch.ones(1, 2)
    got = fp8_kernels.dequantize(q, s, 128, torch.float32)
    numbers = (torch.arange(256) & 0x7F) != 0x7F
    want = q.float()
    torch.testing.assert_close(got[:, numbers], want[:, numbers], rtol=0, atol=0)
    if not AVX2:
        assert got[:, ~numbers].isnan().all()


@pytest.mark.parametrize("largest_scale", [2.0**6, 2.0**9])
def test_gemv_and_panel_hold_subnormal_and_extreme_weights(largest_scale):
    # E4M3's subnormals (exponent field 0) and largest values take the same path as any other
    # byte, under tiny scales and large ones (from 2^7 the AVX2 build decodes through halves).
    g = torch.Generator().manual_seed(0)
    numbers = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    q = numbers[torch.randint(len(numbers), (40, 300), generator=g)].view(torch.float8_e4m3fn)
    s = torch.tensor([[2.0**-40, 2.0**-3, largest_scale]])
    for m in (1, 3, fp8_kernels.max_rows(), fp8_kernels.max_rows() + 1):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, 300, generator=g).to(dtype)
            y = fp8_kernels.fp8_linear(x, q, s, 128)
            y_ref = fp8.reference_linear(x, q, s)
            tol = _tolerance(x, fp8.dequantize(q, s), y_ref, exact_weights=True)
            assert ((y.float() - y_ref.float()).abs() <= tol).all(), (m, dtype)
    assert torch.equal(fp8_kernels.dequantize(q, s, 128, torch.float32), fp8.dequantize(q, s))


def test_linear_dispatches_on_the_weight_dtype():
    w = torch.randn(200, 96) * 0.1
    q, s = fp8.quantize(w, "ue8m0")
    x = torch.randn(2, 96).bfloat16()
    y = linear(x, q, scale=s)
    torch.testing.assert_close(y, fp8.reference_linear(x, q, s), rtol=2**-7, atol=1e-4)
    # The same weight in bf16 goes the bf16 way; an fp8 weight without a scale is refused.
    torch.testing.assert_close(
        linear(x, fp8.dequantize(q, s, torch.bfloat16)), y, rtol=2**-6, atol=1e-3
    )
    with pytest.raises(ValueError, match="scale"):
        linear(x, q)


# ---- The packed layout (csrc/fp8_packed.cpp): what bf16 models load FP8 weights into ---------

packed_only = pytest.mark.skipif(
    not fp8_kernels.packed_available(), reason="packed fp8 kernel needs AVX-512 BF16"
)


def _packed_tolerance(x, q, s, y_ref) -> torch.Tensor:
    """The GEMV reads E4M3's subnormals (|q| <= 7 * 2^-9) as 0 (vdpbf16ps treats denormal bf16
    inputs as zero): besides the rounding `_tolerance` allows, each such weight may be off by
    |x| * 2^-6 * its block's scale. The AMX path dequantizes exactly, rounding once to bf16."""
    w = fp8.dequantize(q, s)
    subnormal = ((q.view(torch.uint8) & 0x78) == 0) & ((q.view(torch.uint8) & 0x07) != 0)
    full = fp8.expand_scales(s, fp8.block_rows(q, s), *q.shape)
    flushed = x.float().abs() @ (subnormal * full * 2**-6).T
    return _tolerance(x, w, y_ref, exact_weights=False) + flushed


def _check_packed(m, n, k, scale_fmt, rows, bias, seed, amx_min_rows):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, : min(k, 8)] = 1e-6  # some subnormals whatever the seed
    q, s = fp8.quantize(w, scale_fmt, rows=rows)
    x = torch.randn(m, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    packed = fp8_kernels.pack(q)
    assert packed.shape == (n // 16, k // 4, 64)
    assert torch.equal(fp8_kernels.unpack(packed).view(torch.uint8), q.view(torch.uint8))
    ext = fp8_kernels.PACKED.load()
    y = ext.fp8_packed_linear(x, packed, s, b, amx_min_rows)
    y_ref = fp8.reference_linear(x, q, s, b)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    err = (y.float() - y_ref.float()).abs()
    tol = _packed_tolerance(x, q, s, y_ref)
    assert (err <= tol).all(), f"max excess {(err - tol).max().item()}"


@packed_only
@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 32),
    n16=st.integers(1, 160),
    k4=st.integers(1, 700),
    scale_fmt=st.sampled_from(fp8.SCALE_FMTS),
    rows=st.sampled_from(fp8.ROW_BLOCKS),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(m=1, n16=1, k4=1, scale_fmt="ue8m0", rows=128, bias=False, seed=0)
@example(m=1, n16=72, k4=224, scale_fmt="ue8m0", rows=128, bias=True, seed=1)  # Qwen's qkv
@example(m=5, n16=56, k4=1216, scale_fmt="float", rows=128, bias=False, seed=2)  # Qwen's down
@example(m=3, n16=9, k4=33, scale_fmt="float", rows=16, bias=True, seed=3)  # edge blocks
def test_packed_gemv_matches_reference(m, n16, k4, scale_fmt, rows, bias, seed):
    _check_packed(m, 16 * n16, 4 * k4, scale_fmt, rows, bias, seed, amx_min_rows=0)


@pytest.mark.skipif(
    not fp8_kernels.packed_available() or fp8_kernels.amx_min_rows() == 0,
    reason="needs AMX (and Linux's leave to use its tiles)",
)
@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(1, 70),
    n16=st.integers(1, 40),
    k4=st.integers(1, 400),
    scale_fmt=st.sampled_from(fp8.SCALE_FMTS),
    rows=st.sampled_from(fp8.ROW_BLOCKS),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(m=40, n16=3, k4=33, scale_fmt="float", rows=16, bias=True, seed=0)  # K % 32 != 0
def test_packed_amx_matches_reference(m, n16, k4, scale_fmt, rows, bias, seed):
    _check_packed(m, 16 * n16, 4 * k4, scale_fmt, rows, bias, seed, amx_min_rows=1)


@packed_only
def test_packed_gemv_keeps_large_and_small_x():
    # x is scaled by 2^a inside (a < 120 once max |x| nears bf16's range): huge and tiny rows
    # both come out at their own size.
    q, s = fp8.quantize(torch.randn(32, 256) * 0.05, "ue8m0")
    packed = fp8_kernels.pack(q)
    for magnitude in (2.0**-60, 1.0, 2.0**60, 2.0**100):
        x = (torch.randn(2, 256) * magnitude).bfloat16()
        y = fp8_kernels.PACKED.load().fp8_packed_linear(x, packed, s, None, 0)
        y_ref = fp8.reference_linear(x, q, s)
        assert torch.isfinite(y.float()).all()
        err = (y.float() - y_ref.float()).abs()
        assert (err <= _packed_tolerance(x, q, s, y_ref)).all(), magnitude


@packed_only
def test_pack_refuses_nan_and_linear_runs_packed_weights():
    q, s = fp8.quantize(torch.randn(48, 64), "ue8m0")
    bad = q.clone()
    bad.view(torch.uint8)[3, 5] = 0x7F
    with pytest.raises(ValueError, match="NaN"):
        fp8_kernels.pack(bad)
    assert not fp8_kernels.can_pack(q[:40]) and not fp8_kernels.can_pack(q[:, :62])
    packed = fp8_kernels.pack(q)
    for dtype in (torch.bfloat16, torch.float32):  # float32 x unpacks: the rare path
        x = torch.randn(3, 64).to(dtype)
        y = linear(x, packed, scale=s)
        y_ref = fp8.reference_linear(x, q, s)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=2**-7, atol=1e-2)
