"""The compiled sampler (csrc/sampling.cpp) against its float64 torch reference: the same token
for the same uniform draw, for rows mixing every truncation, ties, flat tails and logprobs."""

from __future__ import annotations

import pytest
import torch

from thrifty import kernels
from thrifty.engine.sampler import SamplingTensors, top_k_top_p_min_p
from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.sequence import Sequence


def test_sampling_kernel_builds_here():
    # This machine has a compiler and ninja: a silent fallback would hide a broken build.
    assert kernels.sampling_available()


def random_rows(batch: int, vocab: int, seed: int, flat: bool = False):
    """Logits with a peaked head (or, with flat, a heavy tail), and a random mix of greedy rows,
    temperatures, top-k, top-p, min-p and logprob counts."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * (3 if flat else 2)
    if not flat:
        head = torch.randint(0, vocab, (batch, 12), generator=g)
        logits.scatter_add_(1, head, 6 + 2 * torch.rand(batch, 12, generator=g))

    def pick(p: float, value: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.rand(batch, generator=g) < p, value, off)

    return (
        logits,
        torch.rand(batch, generator=g) * 1.5 + 0.3,  # temperature
        pick(0.4, torch.randint(1, vocab // 2, (batch,), generator=g), torch.full((batch,), vocab)),
        pick(0.6, torch.rand(batch, generator=g) * 0.95 + 0.05, torch.ones(batch)),  # top-p
        pick(0.3, torch.rand(batch, generator=g) * 0.3, torch.zeros(batch)),  # min-p
        torch.rand(batch, generator=g) < 0.15,  # greedy
        torch.rand(batch, generator=g, dtype=torch.float64),  # uniform
        torch.randint(-1, 21, (batch,), generator=g),  # logprobs (-1: none)
    )


def assert_matches_reference(args) -> None:
    got = kernels.sample_rows(*args)
    want = kernels.reference_sample_rows(*args)
    assert got.tokens.tolist() == want.tokens.tolist()
    torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=1e-5)
    assert torch.equal(got.top_ids, want.top_ids)
    torch.testing.assert_close(got.top_logprobs, want.top_logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("vocab", [17, 1000, 5000])
@pytest.mark.parametrize("seed", range(6))
def test_matches_reference(vocab, seed):
    assert_matches_reference(random_rows(48, vocab, seed))


@pytest.mark.parametrize("seed", range(4))
def test_flat_rows_whose_nucleus_reaches_the_tail_match_the_reference(seed):
    # At temperature 1.5 the nucleus of 4000 N(0, 9) logits holds thousands of tokens, most
    # below the first collection bound (2^-12): those rows are decided again over more tokens.
    args = list(random_rows(24, 4000, seed, flat=True))
    args[1] = torch.full((24,), 1.5)
    x = args[0] / 1.5
    probs = x.softmax(-1).sort(-1, descending=True).values
    last = ((probs.cumsum(-1) - probs) < args[3][:, None]).sum(-1) - 1
    assert (probs.gather(1, last[:, None]) < kernels.SAMPLING_MIN_PROB).any()
    assert_matches_reference(args)


@pytest.mark.parametrize("seed", range(4))
def test_tied_bf16_logits_match_the_reference(seed):
    # Logits from a bf16 lm_head tie often: ties are kept and drawn lower id first.
    args = list(random_rows(48, 3000, seed))
    args[0] = (args[0] * 4).round() / 4
    assert (args[0][0].unique().numel()) < 200
    assert_matches_reference(args)


@pytest.mark.parametrize("seed", range(3))
def test_reference_keeps_the_sampler_set(seed):
    # The reference draws from the kept set of top_k_top_p_min_p, the torch sampler's filter.
    logits, temperature, top_k, top_p, min_p, greedy, _, _ = random_rows(32, 500, seed)
    seqs = [
        Sequence(
            "r",
            0,
            [0],
            SamplingParams(
                temperature=float(temperature[b]),
                top_k=int(top_k[b]) if int(top_k[b]) < 500 else 0,
                top_p=float(top_p[b]),
                min_p=float(min_p[b]),
            ),
            None,
            max_model_len=8,
        )
        for b in range(32)
    ]
    t = SamplingTensors.build(seqs, 500, logits.device)
    masked = top_k_top_p_min_p(logits / t.temperature, t)  # min-p on the tempered probs
    kept = torch.isfinite(masked)
    # Inverse CDF at u = 0.005, 0.015, ..., 0.995 lands on every token of probability over 0.01.
    likely = masked.softmax(-1) > 0.011
    seen = torch.zeros_like(kept)
    for u in torch.linspace(0.005, 0.995, 100, dtype=torch.float64):
        tokens = kernels.sample_rows(
            logits,
            temperature,
            top_k,
            top_p,
            min_p,
            torch.zeros(32, dtype=torch.bool),
            torch.full((32,), float(u), dtype=torch.float64),
            torch.full((32,), -1),
        ).tokens
        seen[torch.arange(32), tokens] = True
    assert not (seen & ~kept).any()  # never a token outside the set
    assert not (likely & ~seen).any()  # and each of its likely tokens in its share of draws
