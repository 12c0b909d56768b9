"""Tensor and expert parallelism's loading: each rank reads only its slice of each tensor.

A layer with a `shard` (models/parallel.py, MLA's kv_b_proj) takes its rows or columns, each
merged part (q, k, v; gate, up) on its own; an expert another rank holds is not read at all;
everything else is read whole (norms, routers, MLA's latent projections). An FP8 weight's
128x128 block scales are cut with it. Safetensors tensors come as TensorSlice, so only the
slice's bytes are read; others (GGUF dequantized, pickled) are cut from the whole tensor and
copied, so that the whole is freed at once. A GGUF weight's rows, and its columns where the
cut falls between blocks, are read as bytes and stay quantized (GgufTensor.narrow).
"""

from __future__ import annotations

import torch
from torch import nn

from thrifty import distributed
from thrifty.errors import ThriftyError
from thrifty.loader.checkpoint import TensorSlice
from thrifty.loader.gguf_weights import GgufTensor
from thrifty.quant import fp8


def read_shard(
    model: nn.Module, name: str, split: tuple[str, int | None, int | None], tensor
) -> torch.Tensor | None:
    """This rank's part of checkpoint tensor `name` (its parameter and merged part in `split`,
    as _split_packed says); None for a tensor of an expert held by another rank.

    An FP8 weight's block scales (`<weight>_scale_inv`, one per 128x128 block) follow their
    weight: the rank's blocks, which its slice must cover whole."""
    target, part, _ = split
    scale = target.endswith(fp8.SCALE_SUFFIX)
    module_name, _, attr = target.removesuffix(fp8.SCALE_SUFFIX).rpartition(".")
    module = _submodule(model, module_name)
    if module is None:
        return None if _is_remote(model, module_name) else _read(tensor)  # the loader names it
    shard = getattr(module, "shard", None)
    local = getattr(module, attr, None)
    if shard is None or not isinstance(local, torch.Tensor) or shard.dim >= local.dim():
        return _read(tensor)  # replicated (a row-parallel layer's bias too)
    part = part or 0
    start, length, full = shard.start(part), shard.size(part), shard.parts[part]
    cuts_a_block = start % fp8.BLOCK or (length % fp8.BLOCK and start + length != full)
    if cuts_a_block and (scale or _is_fp8(tensor)):
        raise ThriftyError(
            f"FP8 tensor {name!r} cannot be split over {distributed.world_size()} ranks on "
            f"its {fp8.BLOCK}x{fp8.BLOCK} blocks (a rank's {length} of {full} "
            f"{'rows' if shard.dim == 0 else 'columns'}); TP needs a dense checkpoint here"
        )
    if scale:  # the blocks of the rank's rows or columns
        start, length = start // fp8.BLOCK, -(-length // fp8.BLOCK)
    else:
        expected = list(local.shape)
        expected[shard.dim] = full
        if list(tensor.shape) != expected:
            raise ThriftyError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}"
            )
    if isinstance(tensor, TensorSlice):
        return tensor.read(shard.dim, start, length)
    if isinstance(tensor, GgufTensor):
        sliced = tensor.narrow(shard.dim, start, length)
        if sliced is not None:
            return sliced
        tensor = tensor.dequantize()
    return tensor.narrow(shard.dim, start, length).clone()


def _is_fp8(tensor) -> bool:
    if isinstance(tensor, TensorSlice):
        return tensor.dtype == "F8_E4M3"
    return getattr(tensor, "dtype", None) == fp8.FP8_DTYPE  # a GgufTensor has no dtype


def _read(tensor) -> torch.Tensor:
    return tensor.read() if isinstance(tensor, TensorSlice) else tensor


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _is_remote(model: nn.Module, name: str) -> bool:
    """Whether `name` lies under a module held by another rank (a RemoteExpert)."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        module = _submodule(model, ".".join(parts[:i]))
        if module is None:
            return False
        if getattr(module, "remote", False):
            return True
    return False
