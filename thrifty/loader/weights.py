"""Checkpoint tensors -> model parameters, by a small declarative table of renames and merges.

Fails loudly, naming the tensor, on a missing, unexpected or wrongly shaped tensor.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import nn

from thrifty import distributed
from thrifty.config import ModelConfig
from thrifty.errors import ThriftyError
from thrifty.loader.checkpoint import iter_tensors
from thrifty.loader.fp8 import Fp8Weights
from thrifty.loader.gguf_weights import GgufTensor, GgufWeights
from thrifty.loader.sharded import read_shard
from thrifty.models import model_class
from thrifty.models.layers import pack_linears

# Tensors some checkpoints carry that the model recomputes or never uses.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _split_packed(
    name: str, packed: dict[str, list[tuple[str, int | None]]]
) -> tuple[str, int | None, int | None]:
    """Map a checkpoint name to (parameter name, shard index or None, shard rows).

    Rows None: the target splits into equal shards (its size varies by module, as for experts).
    """
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
    quantization: str | None = None,
    max_positions: int | None = None,
) -> nn.Module:
    """Build the model for `cfg` without initialising it and fill it from the checkpoint.

    FP8 weights with block scales load as they are (loader/fp8.py); `quantization="fp8"`
    quantizes the other linear weights on load. A converted GGUF's quantized weights stay
    quantized on the CPU (loader/gguf_weights.py). The rotary table covers `max_positions`
    (default: the model's max_position_embeddings).
    """
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    params = dict(model.named_parameters())  # tied weights appear once, under the embedding
    packed = model.packed_modules()
    # Optional per-model hooks: tensors to skip, parameters kept in float32, and modules a
    # checkpoint may leave out entirely (DeepSeek-V3's MTP layers).
    ignored = IGNORED_SUFFIXES + tuple(getattr(model, "ignored_checkpoint_suffixes", ()))
    float32_params = tuple(getattr(model, "float32_param_suffixes", ()))
    optional = model.optional_modules() if hasattr(model, "optional_modules") else {}
    loaded: dict[str, torch.Tensor] = {}
    pending: dict[str, list[torch.Tensor | None]] = {}
    fp8_weights = Fp8Weights(model, cfg.quantization, quantization, dtype, device)
    gguf_weights = GgufWeights(model, dtype, device, keep=quantization is None)

    # Tensor parallelism: each rank reads only its slice of each tensor (sharded.py), GGUF
    # weights' included (whole rows of blocks, or columns cut between blocks).
    sliced = distributed.world_size() > 1
    tensors = iter_tensors(
        Path(path), allow_pickle=allow_pickle, gguf_quantized=True, sliced=sliced
    )
    for name, tensor in tensors:
        if name.endswith(ignored):
            continue
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue  # some tied checkpoints store the head anyway
        if sliced:
            tensor = read_shard(model, name, _split_packed(name, packed), tensor)
            if tensor is None:  # another rank's expert
                continue
        if fp8_weights.take_scale(name, tensor):
            continue
        target, shard, rows = _split_packed(name, packed)
        if target not in params:
            raise ThriftyError(f"unexpected tensor {name!r} in checkpoint {path}")
        full = params[target].shape
        if shard is not None and rows is None:
            rows = full[0] // len(packed[target.split(".")[-2]])
        expected = full if shard is None else torch.Size((rows, *full[1:]))
        if tensor.shape != expected:
            raise ThriftyError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}"
            )
        if isinstance(tensor, GgufTensor):
            tensor = gguf_weights.take_weight(target, shard, tensor)
            if tensor is None:  # kept quantized
                continue
        if fp8_weights.take_weight(name, target, shard, tensor):
            continue
        if not tensor.is_floating_point():
            raise ThriftyError(f"tensor {name!r} has dtype {tensor.dtype}, expected floating point")
        keep = torch.float32 if float32_params and target.endswith(float32_params) else dtype
        tensor = tensor.to(device=device, dtype=keep)
        if shard is None:
            loaded[target] = tensor
            continue
        parts = pending.setdefault(target, [None] * len(packed[target.split(".")[-2]]))
        parts[shard] = tensor
        if all(p is not None for p in parts):
            loaded[target] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
            del pending[target]

    fp8_weights.finish(loaded, pending, packed)
    gguf_weights.finish(loaded, pending, packed)
    missing = sorted(set(params) - set(loaded))
    for prefix, drop in optional.items():
        under = {m for m in params if m.startswith(prefix)}
        if under and under <= set(missing):  # absent as a whole: run without it
            drop()
            missing = [m for m in missing if m not in under]
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
    loaded.clear()  # the modules hold them: a weight laid out anew below frees its old bytes
    fp8_weights.attach()
    gguf_weights.attach()
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.lm_head.weight_scale_inv = getattr(model.model.embed_tokens, "weight_scale_inv", None)
    if getattr(model, "packs_weights", False) and torch.device(device).type == "cpu":
        pack_linears(model)  # bf16 CPU weights only; others keep the checkpoint's layout
    model.rotary_emb.build(max_positions or cfg.max_position_embeddings, device)
    release_freed_memory()
    return model.eval()


def release_freed_memory() -> None:
    """Hand the heap pages that loading freed (high-precision copies of converted, quantized or
    packed weights) back to the OS, so the resident size is the model's, not its peak. glibc
    keeps freed memory for reuse otherwise; elsewhere this does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
