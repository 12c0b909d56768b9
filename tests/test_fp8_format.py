"""The FP8 block format (thrifty.quant.fp8): round trip, UE8M0 scales, edge blocks, config, bad
scales, and merging shards."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.errors import ThriftyError
from thrifty.kernels.fp8 import dequantized_linear
from thrifty.quant import fp8


def _blocks_err_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3's bound per element: half an ulp, 2^-4 of |w| for normals, 2^-10 * scale below."""
    n, k = w.shape
    full = fp8.expand_scales(scale, fp8.BLOCK, n, k)
    return torch.maximum(w.abs() * 2**-4, full * 2**-10)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 300),
    k=st.integers(1, 300),
    log_std=st.floats(-12, 4),
    scale_fmt=st.sampled_from(fp8.SCALE_FMTS),
    seed=st.integers(0, 2**16),
)
def test_round_trip_within_e4m3_bound(n, k, log_std, scale_fmt, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 2.0**log_std
    q, s = fp8.quantize(w, scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and tuple(s.shape) == (math.ceil(n / 128), math.ceil(k / 128))
    err = (fp8.dequantize(q, s) - w).abs()
    assert (err <= _blocks_err_bound(w, s)).all()
    if scale_fmt == "ue8m0":
        mantissa, _ = torch.frexp(s)
        assert (mantissa == 0.5).all(), "every UE8M0 scale is an exact power of two"
        assert (s >= s.new_tensor(0)).all()


def test_ue8m0_scale_is_the_next_power_of_two_above_amax_over_448():
    w = torch.zeros(256, 128)
    w[0, 0] = 448.0  # exactly representable: scale 1
    w[128, 5] = -449.0  # just above: scale 2
    q, s = fp8.quantize(w, "ue8m0")
    assert s.flatten().tolist() == [1.0, 2.0]
    assert q.float()[0, 0] == 448 and q.float()[128, 5] == -224  # -224.5 to nearest E4M3
    _, sf = fp8.quantize(w, "float")
    assert sf.flatten().tolist() == pytest.approx([1.0, 449 / 448])


def test_edge_blocks_use_their_own_amax():
    # A 130 x 257 weight: blocks of 128 plus edges of 2 rows and 1 column, each with its own max.
    w = torch.full((130, 257), 0.5)
    w[128:, :] = 1000.0  # the bottom edge block row
    w[:, 256] = 3.0  # the right edge block column
    w[129, 256] = -7.0
    q, s = fp8.quantize(w, "float")
    assert tuple(s.shape) == (2, 3)
    expected = torch.tensor([[0.5, 0.5, 3.0], [1000.0, 1000.0, 7.0]]) / 448
    torch.testing.assert_close(s, expected)
    # Each value is its block's max or exact in E4M3 at that scale.
    torch.testing.assert_close(fp8.dequantize(q, s), w, rtol=1e-6, atol=0)


def test_all_zero_block_round_trips_to_zero():
    q, s = fp8.quantize(torch.zeros(5, 7), "ue8m0")
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(fp8.dequantize(q, s), torch.zeros(5, 7))


def test_block_rows_is_inferred_from_the_scale_grid():
    w = torch.empty(960, 576, dtype=fp8.FP8_DTYPE)
    assert fp8.block_rows(w, torch.empty(8, 5)) == 128
    assert fp8.block_rows(w, torch.empty(15, 5)) == 64
    with pytest.raises(ValueError):
        fp8.block_rows(w, torch.empty(9, 5))


@pytest.mark.parametrize("rows", [(128, 128, 256), (576, 192, 192), (200, 56)])
def test_merge_keeps_shards_exact_on_a_finer_grid(rows):
    shards = [torch.randn(n, 300) * (i + 1) for i, n in enumerate(rows)]
    parts = [fp8.quantize(w, "ue8m0") for w in shards]
    q, s = fp8.merge(parts, "ue8m0")
    merged = fp8.dequantize(q, s)
    expected = torch.cat([fp8.dequantize(*p) for p in parts])
    if math.gcd(128, *rows[:-1]) >= 16:
        assert torch.equal(merged, expected)  # bit for bit: same bytes, same scales
    else:  # 200 rows break the 16-row grid: quantized again as one weight
        assert (merged - expected).abs().max() <= 2**-3 * expected.abs().max()


def test_config_round_trip_and_refusals():
    for fmt in fp8.SCALE_FMTS:
        cfg = fp8.Fp8Config(fmt)
        assert fp8.Fp8Config.from_hf(cfg.to_hf()) == cfg
    deepseek_v3 = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    assert fp8.Fp8Config.from_hf(deepseek_v3).scale_fmt == "float"
    bad = [
        ({"fmt": "e5m2"}, "fmt 'e5m2'"),
        ({"scale_fmt": "e4m3"}, "scale_fmt 'e4m3'"),
        ({"weight_block_size": [64, 64]}, "weight_block_size"),
        ({"activation_scheme": "static"}, "activation_scheme 'static'"),
        ({"quant_method": "awq"}, "quant_method 'awq'"),
    ]
    for change, message in bad:
        with pytest.raises(ThriftyError, match=message):
            fp8.Fp8Config.from_hf({**deepseek_v3, **change})


def test_bad_scales_are_refused_by_name():
    w = torch.zeros(200, 300, dtype=fp8.FP8_DTYPE)
    name = "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(ThriftyError, match=r"down_proj.weight'.*no scale.*weight_scale_inv"):
        fp8.check_scale(name, w, None)
    with pytest.raises(ThriftyError, match=r"down_proj.weight_scale_inv' has shape \(2, 2\)"):
        fp8.check_scale(name, w, torch.ones(2, 2))
    nan = torch.ones(2, 3)
    nan[1, 2] = float("nan")
    with pytest.raises(ThriftyError, match=r"down_proj.weight_scale_inv' holds nan at block"):
        fp8.check_scale(name, w, nan)
    with pytest.raises(ThriftyError, match="holds 0.0"):
        fp8.check_scale(name, w, torch.zeros(2, 3))
    assert fp8.check_scale(name, w, torch.ones(2, 3, dtype=torch.bfloat16)).dtype == torch.float32


def test_accelerator_path_dequantizes_to_16_bits_then_matmuls():
    """The path linear() takes for an FP8 weight off the CPU (CUDA, other torch devices): the
    weight dequantized into x's dtype, then the device's matmul. Run here on the CPU, and on
    every accelerator the machine has."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g) * 0.05  # edge blocks both ways
    q, s = fp8.quantize(w, "ue8m0")
    x = torch.randn(5, 200, generator=g).bfloat16()
    b = torch.randn(300, generator=g).bfloat16()
    ref = fp8.reference_linear(x, q, s, b).float()
    for device in devices:
        y = dequantized_linear(x.to(device), q.to(device), s.to(device), b.to(device))
        assert y.dtype == torch.bfloat16 and y.shape == (5, 300)
        # UE8M0 scales make the bf16 weight exact; only the matmul's rounding differs.
        torch.testing.assert_close(y.float().cpu(), ref, rtol=2**-6, atol=2e-3)
