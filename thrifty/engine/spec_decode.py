"""Self-speculative decoding with the model's own multi-token-prediction (MTP) layers.

Each step, a decoding sequence feeds its pending token x_p plus the k tokens d_1..d_k that the MTP
layer drafted last step; one forward of the main model scores all k + 1 positions. Draft d_j is
accepted with probability min(1, p_j(d_j) / q_j(d_j)) (p: the target's distribution after the
request's temperature / top-k / top-p / min-p, q: the draft's, processed alike); at the first
rejection a token is drawn from norm(max(p_j - q_j, 0)), and if all are accepted a bonus token
from p_{k+1} (Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023, arXiv:2302.01318). Each
emitted token is then distributed exactly as plain sampling would draw it; greedy requests
accept a draft only when it is the argmax, so their outputs equal plain greedy decoding.

KV rollback is bookkeeping: the sequence's computed length advances only over x_p and the
accepted drafts, so the cache slots written for rejected drafts are simply overwritten later.

After the tokens are appended (`propose`), the MTP layer runs over every position the main model
just computed, h_t with token x_{t+1}, which keeps its own cache layer filled in step with the main
ones (prompt included), and its output at the last position drafts the next step's tokens; more
than one draft token chains the MTP layer on its own output.

Sequences whose next token depends on more than its logits (penalties, logprobs, a token hook)
decode plainly in the same batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from thrifty.engine.block_manager import BlockManager
from thrifty.engine.model_runner import ForwardBatch, ModelRunner
from thrifty.engine.sampler import SamplingTensors, top_k_top_p_min_p
from thrifty.engine.sequence import Sequence, TokenLogprob


@dataclass
class Draft:
    position: int  # the position of the pending token these drafts follow
    tokens: list[int]
    probs: torch.Tensor  # (k, V) the draft distribution each token was drawn from


@dataclass
class SpecStats:
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens emitted by verified sequences (accepted + one per verification)
    verifications: int = 0
    acceptance_by_position: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verification(self) -> float:
        return self.emitted / self.verifications if self.verifications else 0.0


def eligible(seq: Sequence) -> bool:
    p = seq.params
    return (
        p.logprobs is None
        and p.repetition_penalty == 1
        and not p.presence_penalty
        and not p.frequency_penalty
        and getattr(seq, "token_hook", None) is None
    )


def target_probs(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """Rows of logits (R, V) -> the distribution the request samples from; one-hot if greedy."""
    if seq.params.greedy:
        return torch.zeros_like(logits).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    t = SamplingTensors.build([seq] * logits.shape[0], logits.shape[1], logits.device)
    return top_k_top_p_min_p(logits / t.temperature, t).softmax(dim=-1)


def _draw(probs: torch.Tensor, seq: Sequence) -> int:
    return int(torch.multinomial(probs.cpu(), 1, generator=seq.generator))


def _uniform(seq: Sequence) -> float:
    return float(torch.rand((), generator=seq.generator))


def verify(
    logits: torch.Tensor, draft: Draft, seq: Sequence, stats: SpecStats | None = None
) -> list[int]:
    """The standard acceptance rule: logits (k + 1, V) at x_p, d_1..d_k -> emitted tokens."""
    p = target_probs(logits.float(), seq)
    out = []
    for j, (d, q) in enumerate(zip(draft.tokens, draft.probs, strict=True)):
        pj, qd = p[j], float(q[d])
        # Greedy: p is one-hot, so this accepts exactly the argmax.
        ok = bool(pj[d] > 0) if seq.params.greedy else _uniform(seq) * qd < float(pj[d])
        if not ok:
            residual = (pj - q.to(pj.dtype)).clamp_(min=0)
            out.append(_draw(residual if residual.sum() > 0 else pj, seq))
            return out
        out.append(d)
        if stats is not None:
            while len(stats.acceptance_by_position) <= j:
                stats.acceptance_by_position.append(0)
            stats.acceptance_by_position[j] += 1
    out.append(_draw(p[len(draft.tokens)], seq))
    return out


class SpecDecoder:
    def __init__(self, runner: ModelRunner, blocks: BlockManager, num_tokens: int):
        self.runner = runner
        self.model = runner.model
        self.blocks = blocks
        self.k = num_tokens
        self.drafts: dict[int, Draft] = {}  # seq_id -> drafts for its next step
        self.stats = SpecStats()
        self._last: list[tuple[Sequence, int, int, int]] = []  # (seq, start, rows, first row)
        self._hidden: torch.Tensor | None = None

    @torch.inference_mode()
    def step(
        self, batch: list[tuple[Sequence, int]]
    ) -> tuple[list[Sequence], list[list[int]], list[TokenLogprob | None]]:
        """One forward: prefill chunks, plain decodes and verifications together.

        Advances each verified sequence's computed length by its accepted drafts (the engine
        adds the scheduled token). Returns the sequences that emit, their tokens and logprobs.
        """
        r = self.runner
        fwd = ForwardBatch()
        layout = []  # (seq, start, tokens in the forward, first row, draft or None)
        drafts, self.drafts = self.drafts, {}  # drafts of sequences not scheduled now lapse
        for seq, n in batch:
            start = seq.num_computed_tokens
            draft = drafts.get(seq.seq_id)
            tokens = seq.token_ids[start : start + n]
            if draft is not None and not self._usable(draft, seq, n):
                draft = None
            if draft is not None:
                tokens = tokens + draft.tokens
            layout.append((seq, start, len(tokens), fwd.add(seq, start, tokens), draft))
            r.count(seq, start, n)
        hidden = fwd.run(self.model, r.block_size, r.device)
        self._hidden = hidden
        self._last = []
        # One head matmul for every row that needs logits: sampled rows and verified rows.
        plain, checks, rows = [], [], []
        for seq, start, n, first, draft in layout:
            if draft is not None:
                checks.append((seq, n, draft, len(rows)))
                rows += range(first, first + n)
            elif start + n == seq.num_tokens:
                plain.append((seq, len(rows)))
                rows.append(first + n - 1)
        logits = None
        if rows:
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=r.device)])
        emitted: dict[int, tuple[list[int], TokenLogprob | None]] = {}
        if plain:
            sel = torch.tensor([i for _, i in plain], device=r.device)
            tokens, lps = r.sampler(logits[sel], [seq for seq, _ in plain])
            for (seq, _), token, lp in zip(plain, tokens, lps, strict=True):
                emitted[seq.seq_id] = ([token], lp)
        for seq, n, draft, i in checks:
            tokens = verify(logits[i : i + n], draft, seq, self.stats)
            accepted = len(tokens) - 1
            self.stats.drafted += len(draft.tokens)
            self.stats.accepted += accepted
            self.stats.emitted += len(tokens)
            self.stats.verifications += 1
            seq.num_computed_tokens += accepted  # the engine adds the pending token's 1
            emitted[seq.seq_id] = (tokens, None)
        out_seqs, out_tokens, out_lps = [], [], []
        for seq, start, n, first, draft in layout:  # in batch order
            valid = n if draft is None else len(emitted[seq.seq_id][0])
            self._last.append((seq, start, valid, first))
            if seq.seq_id in emitted:
                out_seqs.append(seq)
                out_tokens.append(emitted[seq.seq_id][0])
                out_lps.append(emitted[seq.seq_id][1])
        self.stats.steps += 1
        return out_seqs, out_tokens, out_lps

    def _usable(self, draft: Draft, seq: Sequence, n: int) -> bool:
        # Drafts follow the pending token; a preempted or re-chunked sequence drops them.
        end = seq.num_computed_tokens + 1 + len(draft.tokens)
        return (
            n == 1
            and draft.position == seq.num_computed_tokens == seq.num_tokens - 1
            and len(seq.block_table) * self.blocks.block_size >= end
        )

    @torch.inference_mode()
    def propose(self) -> None:
        """Run the MTP layer over the positions just computed; draft for decoding sequences."""
        r, model = self.runner, self.model
        fwd, rows, live = ForwardBatch(), [], []
        for seq, start, n, first in self._last:
            if seq.finished or seq.num_tokens < start + n + 1:
                continue
            rows += range(first, first + n)
            fwd.add(seq, start, seq.token_ids[start + 1 : start + n + 1])  # x_{t+1} beside h_t
            live.append(seq)
        self._last = []
        if not live:
            return
        hidden = self._hidden[torch.tensor(rows, device=r.device)]
        g = fwd.run(model.mtp_forward, r.block_size, r.device, hidden)
        self._hidden = None
        # Draft for sequences now waiting on one pending token, with room for k more.
        ends = torch.tensor(fwd.query_lens, device=r.device).cumsum(0) - 1
        drafting = []
        for i, seq in enumerate(live):
            p = seq.num_tokens - 1
            k = min(
                self.k,
                seq.params.max_tokens - seq.num_output_tokens - 1,
                seq.max_model_len - 1 - seq.num_tokens,
            )
            if (
                k > 0
                and seq.num_computed_tokens == p
                and eligible(seq)
                and self.blocks.allocate(seq, p + k + 1)
            ):
                drafting.append((i, seq, p, k))
        if not drafting:
            return
        idx = torch.tensor([ends[i] for i, *_ in drafting], device=r.device)
        g = g[idx]  # (B, hidden): the MTP output at each sequence's last computed position
        drafts = {seq.seq_id: Draft(p, [], []) for _, seq, p, _ in drafting}
        for j in range(max(k for *_, k in drafting)):
            live_j = [(b, seq, p, k) for b, (_, seq, p, k) in enumerate(drafting) if k > j]
            if j > 0:  # chain: the MTP layer on its own output and its last draft token
                sel = torch.tensor([b for b, *_ in live_j], device=r.device)
                chain = ForwardBatch()
                for _, seq, p, _ in live_j:
                    chain.add(seq, p + j - 1, drafts[seq.seq_id].tokens[-1:])
                depth = min(j, model.num_mtp_layers - 1)
                forward = functools.partial(model.mtp_forward, depth=depth)
                out = chain.run(forward, r.block_size, r.device, g[sel])
                g = g.index_copy(0, sel, out)
            logits = model.compute_logits(g[torch.tensor([b for b, *_ in live_j])])
            for row, (_, seq, _, _) in enumerate(live_j):
                q = target_probs(logits[row : row + 1], seq)[0]
                d = drafts[seq.seq_id]
                d.tokens.append(int(q.argmax()) if seq.params.greedy else _draw(q, seq))
                d.probs.append(q)
        for seq_id, d in drafts.items():
            d.probs = torch.stack(d.probs)
            self.drafts[seq_id] = d
