"""thrifty.kernels.bf16_linear against the float32 reference on the same bf16 inputs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty import kernels


@pytest.fixture(scope="module", autouse=True)
def compiled_kernel():
    # Every test here must exercise the compiled kernel, not bf16_linear's F.linear fallback:
    # where available() is False on a CPU that can run it, rebuild to fail with the compiler's
    # words. A CPU without AVX-512 BF16 never runs it (tests/test_kernel_selection.py checks
    # that models take torch's matmul there).
    if not kernels.available():
        if not kernels._cpu_has_avx512_bf16():
            pytest.skip("this CPU lacks avx512_bf16: the bf16 kernels are not built for it")
        kernels._build()
        pytest.fail("thrifty.kernels built but did not load")


def ordered(bits: torch.Tensor) -> torch.Tensor:
    """bf16 values as integers in value order, so that neighbours differ by one (one ulp)."""
    s = bits.view(torch.int16).int()
    return torch.where(s < 0, -(s + 32768), s)


def assert_matches_reference(x, w, b):
    y = kernels.bf16_linear(x, w, b)
    ref = kernels.reference_linear(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    exact = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    torch.testing.assert_close(y.float(), exact, rtol=1e-2, atol=1e-3)
    # Both round an fp32 sum once; the sums differ only in order, which moves a few outputs
    # across a rounding boundary (by one ulp, or a few where the sum cancels to near zero).
    ulps = (ordered(y) - ordered(ref)).abs()
    assert (ulps <= 1).float().mean() >= 0.99


def bf16(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(torch.bfloat16)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 32),
    n=st.integers(1, 80),
    k=st.one_of(st.sampled_from([1, 7, 31, 32, 33, 576, 577, 896, 4864]), st.integers(1, 1200)),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_matches_reference(m, n, k, has_bias, seed):
    torch.manual_seed(seed)
    x, w = bf16(m, k), bf16(n, k, scale=0.05)
    assert_matches_reference(x, w, bf16(n) if has_bias else None)


@pytest.mark.parametrize("m", [1, 2, 3, 8, 17])
@pytest.mark.parametrize("n, k", [(960, 576), (3072, 576), (576, 1536), (896, 4864)])
def test_model_shapes(m, n, k):
    torch.manual_seed(m * n + k)
    assert_matches_reference(bf16(m, k), bf16(n, k, scale=0.05), bf16(n))


@pytest.mark.parametrize("k", [1, 33, 577])
def test_small_integers_are_exact(k):
    # Integer products and sums below 2^24 are exact in fp32, so both sides round the same sum.
    torch.manual_seed(k)
    x = torch.randint(-2, 3, (5, k)).to(torch.bfloat16)
    w = torch.randint(-2, 3, (37, k)).to(torch.bfloat16)
    b = torch.randint(-8, 9, (37,)).to(torch.bfloat16)
    torch.testing.assert_close(kernels.bf16_linear(x, w, b), kernels.reference_linear(x, w, b))


def test_non_contiguous_and_batched_x():
    torch.manual_seed(0)
    w, b = bf16(50, 577, scale=0.05), bf16(50)
    x = bf16(4, 3, 577).transpose(0, 1)  # (3, 4, 577), not contiguous
    assert not x.is_contiguous()
    y = kernels.bf16_linear(x, w, b)
    assert y.shape == (3, 4, 50)
    torch.testing.assert_close(y, kernels.bf16_linear(x.contiguous(), w, b), rtol=0, atol=0)
    assert_matches_reference(bf16(1, 6, 64)[..., ::2], bf16(9, 32), None)  # strided last dim


def test_same_result_on_one_thread_and_two():
    # Each output row is summed by one thread in a fixed order: results do not depend on threads.
    torch.manual_seed(0)
    x, w = bf16(3, 576), bf16(4096, 576, scale=0.05)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.bf16_linear(x, w, None)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(kernels.bf16_linear(x, w, None), one, rtol=0, atol=0)


def test_empty_x():
    y = kernels.bf16_linear(bf16(0, 64), bf16(10, 64), None)
    assert y.shape == (0, 10)


@pytest.mark.parametrize(
    "x, w, b",
    [
        (bf16(2, 64), bf16(64, 10).t(), None),  # weight not contiguous: would copy every call
        (bf16(2, 64), bf16(10, 64).float(), None),  # float weight
        (bf16(2, 64).float(), bf16(10, 64), None),  # float x
        (bf16(2, 63), bf16(10, 64), None),  # in_features mismatch
        (bf16(2, 64), bf16(10, 64), bf16(11)),  # bias of the wrong size
        (bf16(2, 64), bf16(10, 64), bf16(10).float()),  # float bias
    ],
)
def test_rejects_bad_inputs(x, w, b):
    with pytest.raises(ValueError, match="bf16_linear"):
        kernels.bf16_linear(x, w, b)
