"""The batched sampler: greedy, truncation (top-k, top-p, min-p), temperature, seeds, penalties,
logprobs. Rows are Sequences built directly; no model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from thrifty.engine.sampler import (
    Sampler,
    SamplingTensors,
    apply_penalties,
    candidate_logits,
    top_k_top_p_min_p,
)
from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.sequence import Sequence

V = 64  # vocab size of the random-logits tests
# Chi-square critical value at p = 0.001 for 3 degrees of freedom (a 4-token vocab).
CHI2_CRIT_DF3 = 16.27


class NullDetokenizer:
    def step(self, all_ids: list[int]) -> str:
        return ""


def make_seq(
    prompt: list[int] | None = None, output: list[int] | None = None, **params
) -> Sequence:
    seq = Sequence(
        "r",
        params.pop("index", 0),
        list(prompt or [0]),
        SamplingParams(**params),
        NullDetokenizer(),
        max_model_len=1024,
    )
    seq.token_ids += output or []
    return seq


@pytest.fixture(params=[True, False], ids=["compiled", "torch"])
def make_sampler(request):
    """The compiled sampler (where it builds) and the torch path it falls back to."""
    return lambda **kw: Sampler(compiled=request.param, **kw)


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def counts_of(tokens: list[int], size: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=size).double()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_is_argmax(make_sampler):
    logits = random_logits(6)
    tokens, logprobs = make_sampler()(logits.clone(), [make_seq(temperature=0) for _ in range(6)])
    assert tokens == logits.argmax(dim=-1).tolist()
    assert logprobs == [None] * 6


@pytest.mark.parametrize(
    "truncation", [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "top_p": 0.5, "min_p": 0.2}]
)
def test_truncation_to_one_token_equals_greedy(truncation, make_sampler):
    logits = random_logits(16, seed=1)
    greedy = logits.argmax(dim=-1).tolist()
    torch.manual_seed(0)
    for temperature in (0.7, 1.0, 5.0):  # a high temperature would spread a miss around
        seqs = [make_seq(temperature=temperature, **truncation) for _ in range(16)]
        tokens, _ = make_sampler()(logits.clone(), seqs)
        assert tokens == greedy


def test_top_k_keeps_exactly_the_k_largest():
    logits = random_logits(3, seed=2)
    seqs = [make_seq(top_k=k) for k in (1, 5, 0)]
    t = SamplingTensors.build(seqs, V, logits.device)
    masked = top_k_top_p_min_p(logits, t)
    for row, k in enumerate((1, 5, V)):
        kept = torch.isfinite(masked[row]).nonzero().flatten().tolist()
        assert sorted(kept) == sorted(logits[row].topk(k).indices.tolist())
        assert torch.equal(masked[row][kept], logits[row][kept])


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log()[None].repeat(4, 1)
    seqs = [make_seq(top_p=p) for p in (0.35, 0.7, 0.71, 0.95)]
    masked = top_k_top_p_min_p(logits, SamplingTensors.build(seqs, 4, logits.device))
    kept = [torch.isfinite(row).nonzero().flatten().tolist() for row in masked]
    assert kept == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]


def test_min_p_masks_tokens_below_a_fraction_of_the_top_probability(make_sampler):
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    logits = probs.log()[None].repeat(2000, 1)
    seqs = [make_seq(min_p=0.25) for _ in range(2000)]  # threshold 0.125
    masked = top_k_top_p_min_p(logits[:1], SamplingTensors.build(seqs[:1], 4, logits.device))
    assert torch.isfinite(masked[0]).tolist() == [True, True, False, False]

    torch.manual_seed(0)
    tokens, _ = make_sampler()(logits, seqs)
    counts = counts_of(tokens, 4)
    assert counts[2] == counts[3] == 0
    assert chi_square(counts[:2], torch.tensor([0.5, 0.3]) / 0.8) < 10.83  # df 1, p 0.001


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_sampling_follows_the_tempered_distribution(temperature, make_sampler):
    base = torch.tensor([0.5, 0.25, 0.15, 0.1])
    draws = 20_000
    logits = base.log()[None].repeat(draws, 1)
    torch.manual_seed(1)
    tokens, _ = make_sampler()(logits, [make_seq(temperature=temperature) for _ in range(draws)])
    counts = counts_of(tokens, 4)
    tempered = base ** (1 / temperature)
    tempered /= tempered.sum()
    assert chi_square(counts, tempered) < CHI2_CRIT_DF3
    if temperature != 1.0:  # the test tells a wrong temperature apart
        assert chi_square(counts, base) > 10 * CHI2_CRIT_DF3


def test_seeded_draws_are_reproducible(make_sampler):
    logits = torch.zeros(1, V)  # uniform: every draw is all noise

    def draws(seed: int) -> list[int]:
        seq = make_seq(seed=seed)  # one sequence: its stream advances from draw to draw
        return [make_sampler()(logits.clone(), [seq])[0][0] for _ in range(30)]

    a = draws(7)
    assert draws(7) == a
    assert draws(8) != a
    assert len(set(a)) > 10


def test_seeded_row_does_not_depend_on_its_batch(make_sampler):
    logits = random_logits(1, seed=3)[0] / 3  # a spread-out distribution

    def draws(companions: int, position: int) -> list[int]:
        seeded = make_seq(seed=11, top_p=0.9)
        others = [
            make_seq(temperature=[0, 0.8, 1.5][i % 3], top_k=i % 4, seed=i if i % 2 else None)
            for i in range(companions)
        ]
        batch = others[:position] + [seeded] + others[position:]
        rows = random_logits(len(batch), seed=4)
        rows[position] = logits
        out = []
        for _ in range(20):
            out.append(make_sampler()(rows.clone(), batch)[0][position])
        return out

    alone = draws(0, 0)
    assert len(set(alone)) > 3
    torch.manual_seed(123)  # unseeded companions draw from the global stream
    assert draws(5, 2) == alone
    torch.manual_seed(456)
    assert draws(3, 3) == alone


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 3.0, -2.0, 1.0, 0.5]])
    seq = make_seq(prompt=[0, 1], output=[1, 3], repetition_penalty=2.0)
    out = apply_penalties(logits.clone(), [seq])
    # Seen in the prompt or the output: 0, 1, 3. Unseen: 2, 4, 5.
    assert out.tolist() == [[1.0, -2.0, 3.0, -4.0, 1.0, 0.5]]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    seq = make_seq(prompt=[0, 4], output=[1, 1, 1, 2], presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits.clone(), [seq])
    expected = [1.0, 1.0 - 0.5 - 3 * 0.25, 1.0 - 0.5 - 0.25, 1.0, 1.0]
    assert out[0].tolist() == pytest.approx(expected)


def test_penalties_apply_per_row_and_change_the_greedy_choice(make_sampler):
    logits = torch.tensor([[5.0, 4.0, 0.0], [5.0, 4.0, 0.0]])
    penalized = make_seq(prompt=[9], output=[0], temperature=0, frequency_penalty=2.0)
    plain = make_seq(prompt=[9], output=[0], temperature=0)
    tokens, _ = make_sampler()(logits.clone(), [penalized, plain])
    assert tokens == [1, 0]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_are_log_softmax_with_a_sorted_top_k(temperature, make_sampler):
    logits = random_logits(4, seed=5)
    seqs = [
        make_seq(temperature=temperature, logprobs=5, seed=1),
        make_seq(temperature=temperature, logprobs=0, seed=2),
        make_seq(temperature=temperature, seed=3),
        make_seq(temperature=temperature, logprobs=20, seed=4),
    ]
    tokens, logprobs = make_sampler()(logits.clone(), seqs)
    reference = logits.log_softmax(dim=-1)
    assert logprobs[2] is None
    for row, k in ((0, 5), (1, 0), (3, 20)):
        lp = logprobs[row]
        assert lp.token_id == tokens[row]
        assert lp.logprob == pytest.approx(float(reference[row, tokens[row]]), abs=1e-5)
        assert len(lp.top) == k
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        expected = reference[row].topk(k) if k else None
        if k:
            assert [i for i, _ in lp.top] == expected.indices.tolist()
            assert values == pytest.approx(expected.values.tolist(), abs=1e-5)
    if temperature == 0:
        assert logprobs[0].top[0] == (tokens[0], logprobs[0].logprob)


def peaked_logits(rows: int, seed: int) -> torch.Tensor:
    """Logits whose top 16 tokens hold most of the mass, as a language model's usually do."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, V, generator=g)
    head = torch.randperm(V, generator=g)[:12]
    logits[:, head] += 4 + torch.rand(rows, 12, generator=g) * 2
    return logits


@pytest.mark.parametrize("seed", range(4))
def test_candidate_path_keeps_the_reference_set_and_probabilities(seed):
    logits = peaked_logits(12, seed)
    params = [
        {"top_p": 0.9},
        {"top_p": 0.5, "temperature": 0.7},
        {"top_k": 5},
        {"top_k": 16, "top_p": 0.8},
        {"top_k": 40},  # more than the candidates: the full path
        {"top_p": 0.999999},  # the candidates do not hold the mass: the full path
        {"top_p": 0.95, "min_p": 0.05},
        {},  # no truncation: the full path
        {"top_k": 3, "temperature": 2.0},
        {"top_p": 0.7, "temperature": 1.5},
        {"top_k": 1},
        {"top_p": 0.97},
    ]
    seqs = [make_seq(**p) for p in params]
    t = SamplingTensors.build(seqs, V, logits.device)
    scaled = logits / t.temperature
    reference = top_k_top_p_min_p(scaled, replace(t, min_p=None))
    fits, values, ids = candidate_logits(scaled, t, 16)
    assert fits.tolist()[4:6] == [False, False] and fits.tolist()[7] is False
    assert fits[[0, 1, 2, 3, 8, 10]].all()
    for row in fits.nonzero().flatten().tolist():
        got = torch.full((V,), float("-inf")).scatter(0, ids[row], values[row])
        assert torch.equal(torch.isfinite(got), torch.isfinite(reference[row])), params[row]
        assert torch.allclose(got.softmax(-1), reference[row].softmax(-1), atol=1e-6)


def test_candidate_sampling_follows_the_truncated_distribution(make_sampler):
    base = torch.tensor([0.4, 0.25, 0.15, 0.1, *[0.1 / 60] * 60])
    draws = 20_000
    logits = base.log()[None].repeat(draws, 1)
    torch.manual_seed(2)
    tokens, _ = make_sampler(candidates=8)(logits, [make_seq(top_p=0.8) for _ in range(draws)])
    counts = counts_of(tokens, V)
    assert counts[4:].sum() == 0  # the nucleus is the first four tokens (0.9 >= 0.8 at rank 4)
    kept = base[:4] / base[:4].sum()
    assert chi_square(counts[:4], kept) < CHI2_CRIT_DF3


def test_seeded_row_on_the_candidate_path_does_not_depend_on_its_batch():
    logits = peaked_logits(1, seed=9)[0]

    def draws(companions: int) -> list[int]:
        seeded = make_seq(seed=5, top_p=0.9)
        batch = [seeded, *(make_seq(top_k=i % 3, temperature=1.2) for i in range(companions))]
        rows = peaked_logits(len(batch), seed=10)
        rows[0] = logits
        return [
            Sampler(candidates=16, compiled=False)(rows.clone(), batch)[0][0] for _ in range(20)
        ]

    alone = draws(0)
    assert len(set(alone)) > 2
    torch.manual_seed(7)
    assert draws(4) == alone
