"""Checkpoint tensors -> model parameters, by a small declarative table of renames and merges.

Fails loudly, naming the tensor, on a missing, unexpected or wrongly shaped tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from thrifty.config import ModelConfig
from thrifty.errors import ThriftyError
from thrifty.loader.checkpoint import iter_tensors
from thrifty.models import model_class

# Tensors some checkpoints carry that the model recomputes or never uses.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _split_packed(
    name: str, packed: dict[str, list[tuple[str, int]]]
) -> tuple[str, int | None, int]:
    """Map a checkpoint name to (parameter name, shard index or None, shard rows)."""
    for target, shards in packed.items():
        for i, (source, rows) in enumerate(shards):
            if f".{source}." in name:
                return name.replace(f".{source}.", f".{target}."), i, rows
    return name, None, 0


def load_model(
    path: Path,
    cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
) -> nn.Module:
    """Build the model for `cfg` without initialising it and fill it from the checkpoint."""
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    params = dict(model.named_parameters())  # tied weights appear once, under the embedding
    packed = model.packed_modules()
    loaded: dict[str, torch.Tensor] = {}
    pending: dict[str, list[torch.Tensor | None]] = {}

    for name, tensor in iter_tensors(Path(path), allow_pickle=allow_pickle):
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue  # some tied checkpoints store the head anyway
        target, shard, rows = _split_packed(name, packed)
        if target not in params:
            raise ThriftyError(f"unexpected tensor {name!r} in checkpoint {path}")
        full = params[target].shape
        expected = full if shard is None else torch.Size((rows, *full[1:]))
        if tensor.shape != expected:
            raise ThriftyError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}"
            )
        if not tensor.is_floating_point():
            raise ThriftyError(f"tensor {name!r} has dtype {tensor.dtype}, expected floating point")
        tensor = tensor.to(device=device, dtype=dtype)
        if shard is None:
            loaded[target] = tensor
            continue
        parts = pending.setdefault(target, [None] * len(packed[target.split(".")[-2]]))
        parts[shard] = tensor
        if all(p is not None for p in parts):
            loaded[target] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
            del pending[target]

    missing = sorted(set(params) - set(loaded))
    if missing:
        names = []
        for m in missing:
            module = m.split(".")[-2]
            if module in packed:
                got = pending.get(m, [None] * len(packed[module]))
                names += [
                    m.replace(f".{module}.", f".{src}.")
                    for (src, _), part in zip(packed[module], got, strict=True)
                    if part is None
                ]
            else:
                names.append(m)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ThriftyError(f"checkpoint {path} is missing tensor(s): {shown}")

    for name, tensor in loaded.items():
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary_emb.to(device)
    return model.eval()
