"""Tensor-parallel layers: the Linear and Embedding of layers.py with a shard (Megatron-LM,
arXiv:1909.08053).

- ColumnParallelLinear keeps its rank's rows (output features: its heads, its MLP columns); its
  output stays split, and the next layer reads only its part.
- RowParallelLinear keeps its rank's columns (input features) and sums the ranks' partial
  outputs: one all-reduce after attention and one after the MLP, the only ones in a layer.
- VocabParallelEmbedding keeps a slice of the vocabulary: rows of ids it lacks are zero, and the
  all-reduce fills them in. ParallelLMHead keeps the same slice of the head and gathers the
  logits.

A dimension the ranks do not divide is cut into near-equal runs of whole heads, KV-head groups
or columns, the first ranks one more (distributed.Shard); only the logits' gather needs equal
sizes, and pads. Each layer's `shard` tells the loader which slice of the checkpoint's tensor
to read. With one rank the shard is the whole tensor and forward is the plain layer's: the
collective's forward is installed at construction only when there are several ranks, so one
process pays nothing.
"""

from __future__ import annotations

import torch

from thrifty import distributed
from thrifty.distributed import Shard
from thrifty.models.layers import Embedding, Linear


class ColumnParallelLinear(Linear):
    """y_r = x @ W_r^T for this rank's rows W_r of each merged part (`parts`: q, k, v sizes),
    whole `units` of each (a KV-head group's rows) where a split must not cut one."""

    def __init__(
        self,
        in_features: int,
        parts: list[int],
        bias: bool = False,
        units: list[int] | None = None,
        replicas: list[int] | None = None,
    ):
        self.shard = Shard(
            0,
            tuple(parts),
            None if units is None else tuple(units),
            None if replicas is None else tuple(replicas),
        )
        super().__init__(in_features, self.shard.local, bias)


class RowParallelLinear(Linear):
    """y = sum_r x_r @ W_r^T + b: x_r (this rank's input columns) is what the column-parallel
    layer before it left on this rank (`unit`: the columns of one head or KV-head group)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, unit: int = 1):
        self.shard = Shard(1, (in_features,), (unit,))
        super().__init__(self.shard.local, out_features, bias)
        if distributed.world_size() > 1:
            self.forward = self.reduced_forward

    def _folded_bias(self) -> torch.Tensor | None:
        return None if distributed.world_size() > 1 else self.bias

    def reduced_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = distributed.all_reduce(self.bound_kernel()(x))
        return y if self.bias is None else y + self.bias  # the bias once, not once per rank


class VocabParallelEmbedding(Embedding):
    def __init__(self, num_embeddings: int, dim: int):
        self.shard = Shard(0, (num_embeddings,))
        super().__init__(self.shard.local, dim)
        self.vocab_start = self.shard.start()
        if distributed.world_size() > 1:
            self.forward = self.reduced_forward

    def reduced_forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard.local)
        x = super().forward(local.masked_fill(outside, 0)).masked_fill(outside[:, None], 0)
        return distributed.all_reduce(x)


class ParallelLMHead(ColumnParallelLinear):
    """Logits for this rank's slice of the vocabulary, gathered into the whole (N, vocab);
    the slices differ by a row where the ranks do not divide the vocabulary."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, [vocab_size])
        self.vocab_sizes = self.shard.sizes()
        if distributed.world_size() > 1:
            self.forward = self.gathered_forward

    def gathered_forward(self, x: torch.Tensor) -> torch.Tensor:
        return distributed.all_gather(super().forward(x), dim=-1, sizes=self.vocab_sizes)
