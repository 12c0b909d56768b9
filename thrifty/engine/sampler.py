"""A batched sampler made of small steps: penalties, temperature, top-k, top-p, min-p.

Each row carries its own parameters. Greedy rows short-circuit to argmax. Sampling uses the
exponential race (argmax of p / E with E ~ Exp(1)), which draws from p exactly and lets a seeded
row take its noise from its own generator, so its output does not depend on the batch around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty import kernels
from thrifty.engine.sequence import Sequence, TokenLogprob


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # (B, 1); 1 for greedy rows (unused there)
    top_k: torch.Tensor | None  # (B,) vocab size where off
    top_p: torch.Tensor | None  # (B,)
    min_p: torch.Tensor | None  # (B,)
    greedy: torch.Tensor  # (B,) bool

    @staticmethod
    def build(seqs: list[Sequence], vocab_size: int, device: torch.device) -> SamplingTensors:
        ps = [s.params for s in seqs]

        def col(values: list[float], dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return SamplingTensors(
            temperature=col([p.temperature if p.temperature > 0 else 1.0 for p in ps])[:, None],
            top_k=col([p.top_k or vocab_size for p in ps], torch.long)
            if any(0 < p.top_k < vocab_size for p in ps)
            else None,
            top_p=col([p.top_p for p in ps]) if any(p.top_p < 1 for p in ps) else None,
            min_p=col([p.min_p for p in ps]) if any(p.min_p > 0 for p in ps) else None,
            greedy=col([p.greedy for p in ps], torch.bool),
        )


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition (prompt and output), presence and frequency (output) penalties, in place."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            out = torch.tensor(seq.output_token_ids, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def top_k_top_p_min_p(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Mask (to -inf) the tokens outside each row's top-k, nucleus and min-p sets."""
    if t.min_p is not None:
        probs = logits.softmax(dim=-1)
        threshold = t.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if t.top_k is None and t.top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if t.top_k is not None:
        ranks = torch.arange(logits.shape[1], device=logits.device)
        sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= t.top_k[:, None], float("-inf"))
    if t.top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it
        # already does. The first token is always kept.
        before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(before >= t.top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    # torch's CPU argmax over a 50k-wide row runs at under 1 GB/s; the compiled one at memory speed.
    on_cpu = logits.device.type == "cpu" and logits.dtype == torch.float32
    if on_cpu and kernels.cpu_ops_available():
        return kernels.argmax(logits)
    return logits.argmax(dim=-1)


class Sampler:
    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Choose one token per row of `logits` (B, V) float32; logprobs where asked for."""
        want_logprobs = any(s.params.logprobs is not None for s in seqs)
        raw_logprobs = logits.log_softmax(dim=-1) if want_logprobs else None
        if any(
            s.params.repetition_penalty != 1
            or s.params.presence_penalty
            or s.params.frequency_penalty
            for s in seqs
        ):
            logits = apply_penalties(logits.clone(), seqs)

        if all(s.params.greedy for s in seqs):
            tokens = _argmax(logits)
        else:
            t = SamplingTensors.build(seqs, logits.shape[1], logits.device)
            scaled = top_k_top_p_min_p(logits / t.temperature, t)
            probs = scaled.softmax(dim=-1)
            noise = torch.empty_like(probs).exponential_()
            for row, seq in enumerate(seqs):
                if seq.generator is not None:
                    noise[row] = torch.empty(probs.shape[1]).exponential_(generator=seq.generator)
            sampled = (probs / noise).argmax(dim=-1)
            tokens = torch.where(t.greedy, logits.argmax(dim=-1), sampled)

        token_list = tokens.tolist()
        out: list[TokenLogprob | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            for row, seq in enumerate(seqs):
                k = seq.params.logprobs
                if k is None:
                    continue
                lp = raw_logprobs[row]
                top = lp.topk(k) if k else None
                out[row] = TokenLogprob(
                    token_list[row],
                    float(lp[token_list[row]]),
                    list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
                    if top
                    else [],
                )
        return token_list, out
