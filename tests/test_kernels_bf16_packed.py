"""The packed weight layout (bf16 and float32) and its kernel against float32 references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_kernels_bf16 import bf16, compiled_kernel, ordered  # noqa: F401 (fixture)
from thrifty import kernels
from thrifty.models.layers import Embedding, Linear, pack_linears


def assert_packed_matches_reference(x, w, b, linear=kernels.packed_linear):
    y = linear(x, kernels.pack_weight(w), b)
    ref = kernels.reference_linear(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    exact = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    torch.testing.assert_close(y.float(), exact, rtol=1e-2, atol=1e-3)
    ulps = (ordered(y) - ordered(ref)).abs()  # one rounding of an fp32 sum on both sides
    assert (ulps <= 1).float().mean() >= 0.99


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 70),
    panels=st.integers(1, 9),
    half_k=st.one_of(st.sampled_from([1, 16, 288, 768]), st.integers(1, 600)),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_packed_matches_reference(m, panels, half_k, has_bias, seed):
    torch.manual_seed(seed)
    n, k = 16 * panels, 2 * half_k
    x, w = bf16(m, k), bf16(n, k, scale=0.05)
    assert_packed_matches_reference(x, w, bf16(n) if has_bias else None)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 40),
    panels=st.integers(1, 9),
    k=st.integers(1, 700),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_packed_float32_matches_torch(m, panels, k, has_bias, seed):
    torch.manual_seed(seed)
    n = 16 * panels
    x, w = torch.randn(m, k), torch.randn(n, k) * 0.05
    b = torch.randn(n) if has_bias else None
    y = kernels.packed_linear(x, kernels.pack_weight(w), b)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 6, 7, 32, 129])
@pytest.mark.parametrize("n, k", [(1728, 576), (576, 1536), (896, 4864), (49152, 576)])
def test_packed_model_shapes(m, n, k):
    torch.manual_seed(m * n + k)
    assert_packed_matches_reference(bf16(m, k), bf16(n, k, scale=0.05), bf16(n))


@pytest.mark.parametrize(
    "dtype, shape", [(torch.bfloat16, (3, 5, 32)), (torch.float32, (3, 10, 16))]
)
def test_pack_round_trip_and_row_reads(dtype, shape):
    w = torch.randn(48, 10).to(dtype)
    packed = kernels.pack_weight(w)
    assert packed.shape == shape
    assert torch.equal(kernels.unpack_weight(packed), w)
    ids = torch.tensor([[0, 47, 16], [15, 17, 3]])
    assert torch.equal(kernels.unpack_rows(packed, ids), w[ids])


def test_only_cpu_weights_of_whole_panels_pack():
    assert kernels.can_pack(bf16(32, 8)) and kernels.can_pack(torch.randn(32, 7))
    assert not kernels.can_pack(bf16(33, 8))  # not whole panels of 16 rows
    assert not kernels.can_pack(bf16(32, 7))  # bf16 steps take column pairs
    assert not kernels.can_pack(torch.randn(32, 8).half())


def test_pack_linears_keeps_a_tied_embedding_and_its_head_in_step():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = Embedding(64, 12)
            self.proj = Linear(12, 12)  # 12 rows: stays unpacked
            self.head = Linear(12, 64)
            self.embed.weight = torch.nn.Parameter(bf16(64, 12), requires_grad=False)
            self.proj.weight = torch.nn.Parameter(bf16(12, 12), requires_grad=False)
            self.head.weight = self.embed.weight

    model = Tied()
    ids = torch.tensor([3, 63, 17])
    x = bf16(5, 12)
    want_embed, want_head = model.embed(ids), model.head(x)
    assert pack_linears(model) == 1
    assert model.head.weight.dim() == 3 and model.embed.weight is model.head.weight
    assert model.proj.weight.dim() == 2
    assert torch.equal(model.embed(ids), want_embed)
    ulps = (ordered(model.head(x)) - ordered(want_head)).abs()
    assert ulps.max() <= 1


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 80),
    panels=st.integers(1, 9),
    k32=st.integers(1, 40),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_amx_matches_reference(m, panels, k32, has_bias, seed):
    """The AMX kernel on the packed layout, called directly at every row count (the dispatch
    sends it only AMX_MIN_ROWS and more): whole tiles, tails of rows and an odd panel."""
    if not kernels._cpu_has_amx():
        assert not kernels.amx_available()
        return
    assert kernels.amx_available()  # a CPU with AMX tiles must get the kernel
    torch.manual_seed(seed)
    n, k = 16 * panels, 32 * k32
    x, w = bf16(m, k), bf16(n, k, scale=0.05)
    b = bf16(n) if has_bias else None
    assert_packed_matches_reference(x, w, b, linear=kernels._amx().amx_packed_linear)


def test_packed_linear_sends_many_rows_to_amx(monkeypatch):
    if not kernels.amx_available():
        return
    calls = []
    amx = kernels._amx()

    class Spy:
        def amx_packed_linear(self, *args):
            calls.append(args[0].shape[0])
            return amx.amx_packed_linear(*args)

    monkeypatch.setattr(kernels, "_amx", lambda: Spy())
    w = kernels.pack_weight(bf16(32, 64))
    for m in (1, kernels.AMX_MIN_ROWS - 1, kernels.AMX_MIN_ROWS, 100):
        kernels.packed_linear(bf16(m, 64), w)
    assert calls == [kernels.AMX_MIN_ROWS, 100]
