"""The compiled FP8 linear (thrifty.kernels.fp8) against the pure-torch reference, shapes from
1x64 to 64x4096x4096, and linear()'s dispatch on the weight's dtype."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from thrifty.kernels import fp8 as fp8_kernels
from thrifty.models.layers import linear
from thrifty.quant import fp8

pytestmark = pytest.mark.skipif(
    not fp8_kernels.available(), reason="fp8 kernel needs AVX-512 BF16 + VBMI and a compiler"
)


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
    gemv = m <= fp8_kernels.MAX_ROWS and dtype == torch.bfloat16
    exact = gemv or scale_fmt == "ue8m0" or dtype == torch.float32
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
    # All 256 byte values (NaNs included) as one row, scale 1: the lookup tables are complete.
    q = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).view(1, 256)
    s = torch.ones(1, 2)
    got = fp8_kernels.dequantize(q, s, 128, torch.float32)
    torch.testing.assert_close(got, q.float(), equal_nan=True, rtol=0, atol=0)


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
