"""DeepSeek mixture of experts: a router picks k experts per token, shared experts see every token.

Routing (`route`) follows DeepSeek-V2 (softmax scores, optionally limited to the best `topk_group`
of `n_group` expert groups by their best score) and DeepSeek-V3 (sigmoid scores; a per-expert
`e_score_correction_bias` steers the choice but not the weights; groups ranked by the sum of their
two best scores). The experts run grouped (`grouped_experts`): the (token, expert) pairs are
sorted by expert, so each chosen expert runs once per step on all of its tokens.

Under expert parallelism (one rank per slice of the experts, `ep_experts`) each rank routes its
share of the tokens, sends each (token, expert) pair to the expert's rank (all-to-all dispatch),
runs its own experts on what arrives and sends the results back (all-to-all combine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thrifty import distributed
from thrifty.config import MoEConfig
from thrifty.models.layers import Linear, Module
from thrifty.models.parallel import ColumnParallelLinear, RowParallelLinear


class Expert(Module):
    """A SwiGLU MLP; gate and up are stored merged (the loader's `packed_modules`).

    `tensor_parallel`: split across the ranks (a dense MLP, the shared experts); a routed expert
    stays whole on the one rank that holds it.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, tensor_parallel: bool = True):
        super().__init__()
        if tensor_parallel:
            ffn = intermediate_size
            self.gate_up_proj: Linear = ColumnParallelLinear(hidden_size, [ffn, ffn])
            self.down_proj: Linear = RowParallelLinear(ffn, hidden_size)
        else:
            self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size)
            self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Router(Module):
    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size), requires_grad=False)
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(
                torch.empty(cfg.num_experts), requires_grad=False
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids), each (N, k): weights in float32."""
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        bias = getattr(self, "e_score_correction_bias", None)
        return route(logits, self.cfg, None if bias is None else bias.float())


def route(
    logits: torch.Tensor, cfg: MoEConfig, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose cfg.num_experts_per_tok experts per row of router logits (N, E)."""
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias
    if cfg.topk_method in ("group_limited_greedy", "noaux_tc") and cfg.n_group > 1:
        n, e = choice.shape
        grouped = choice.view(n, cfg.n_group, e // cfg.n_group)
        if cfg.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
        else:
            group_scores = grouped.max(dim=-1).values
        keep = group_scores.topk(cfg.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        # V3 drops the other groups to -inf, V2 to 0: the same choice among non-negative scores.
        choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(n, e)
    ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # (N, k)
    weights = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids


def grouped_experts(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: nn.ModuleList
) -> torch.Tensor:
    """sum_j weights[:, j] * experts[ids[:, j]](x), each chosen expert run once on its tokens.

    x: (N, D); weights, ids: (N, k).
    """
    k = ids.shape[1]
    flat = ids.flatten()  # (N * k,) pair p is token p // k
    order = flat.argsort(stable=True)
    hit, counts = flat[order].unique_consecutive(return_counts=True)
    token = order // k
    xs = x[token]  # (N * k, D) grouped by expert
    out = torch.empty_like(xs)
    start = 0
    for e, c in zip(hit.tolist(), counts.tolist(), strict=True):  # each chosen expert once
        out[start : start + c] = experts[e](xs[start : start + c])
        start += c
    out = out * weights.flatten()[order, None].to(out.dtype)
    return torch.zeros_like(x).index_add_(0, token, out)


def naive_experts(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: nn.ModuleList
) -> torch.Tensor:
    """The per-token loop that grouping replaces: the benchmark's baseline and the tests' oracle."""
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(ids.shape[1]):
            out[i] += weights[i, j].to(x.dtype) * experts[int(ids[i, j])](x[i : i + 1])[0]
    return out


class RemoteExpert(Module):
    """The place of an expert held by another rank: no weights (the loader skips its tensors)."""

    remote = True


def ep_experts(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: nn.ModuleList
) -> torch.Tensor:
    """grouped_experts with the experts split over the ranks in near-equal runs, in order
    (`expert_owner`), the others' places held by RemoteExperts.

    Every rank has the same N tokens (attention is tensor parallel): each routes its own
    ceil(N / R) of them, and the rows come back together with one all-gather.
    x: (N, D); weights, ids: (N, k).
    """
    world, me = distributed.world_size(), distributed.rank()
    n, k = ids.shape
    per_rank = -(-n // world)
    mine = slice(min(me * per_rank, n), min((me + 1) * per_rank, n))
    xs, flat = x[mine], ids[mine].flatten()  # pair p is token p // k of this rank's share
    owner = expert_owner(flat, len(experts), world)
    order = owner.argsort(stable=True)  # pairs grouped by the expert's rank
    send = torch.bincount(owner, minlength=world)
    sent, received = send.tolist(), distributed.exchange_counts(send)
    # Dispatch: each pair's token and expert to the expert's rank.
    tokens = distributed.all_to_all(xs[order // k], sent, received)
    expert = distributed.all_to_all(flat[order], sent, received)
    ones = torch.ones(len(expert), 1, dtype=weights.dtype, device=x.device)
    done = grouped_experts(tokens, ones, expert[:, None], experts)  # (pairs received, D)
    # Combine: the results go back to the tokens' ranks, in the order they were sent.
    back = distributed.all_to_all(done, received, sent)
    back = back * weights[mine].flatten()[order, None].to(back.dtype)
    out = torch.zeros(per_rank, x.shape[1], dtype=x.dtype, device=x.device)
    out.index_add_(0, order // k, back)
    return distributed.all_gather(out, dim=0)[:n]


def expert_owner(expert: torch.Tensor, num_experts: int, world: int) -> torch.Tensor:
    """The rank holding each expert id: E experts dealt as distributed.chunk deals them, the
    first E % R ranks one more."""
    base, extra = divmod(num_experts, world)
    cut = extra * (base + 1)  # the experts of the ranks that hold one more
    return torch.where(expert < cut, expert // (base + 1), extra + (expert - cut) // max(base, 1))


class MoE(Module):
    """Under expert parallelism this rank builds only its experts; the shared experts are
    split by tensor parallelism like a dense MLP."""

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.gate = Router(hidden_size, cfg)
        first, per_rank = distributed.chunk(
            cfg.num_experts, distributed.world_size(), distributed.rank()
        )
        self.experts = nn.ModuleList(
            Expert(hidden_size, cfg.moe_intermediate_size, tensor_parallel=False)
            if first <= e < first + per_rank
            else RemoteExpert()
            for e in range(cfg.num_experts)
        )
        self.run_experts = grouped_experts if distributed.world_size() == 1 else ep_experts
        if cfg.num_shared_experts:
            self.shared_experts = Expert(
                hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts
            )
        self.has_shared = bool(cfg.num_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.run_experts(x, weights, ids, self.experts)
        return out + self.shared_experts(x) if self.has_shared else out
