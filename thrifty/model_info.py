"""`thrifty show`: what a model is, read from its files without loading its weights."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

from thrifty import hub
from thrifty.config import ModelConfig
from thrifty.errors import ThriftyError
from thrifty.generation_defaults import GenerationDefaults
from thrifty.tokenizer import Tokenizer


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def _tensor_stats(path: Path) -> tuple[int, Counter[str]]:
    """Parameter count and elements per storage type over a directory's safetensors."""
    count, dtypes = 0, Counter[str]()
    for file in sorted(path.glob("*.safetensors")):
        for name, t in _safetensors_header(file).items():
            if name == "__metadata__":
                continue
            n = 1
            for d in t["shape"]:
                n *= d
            if not name.endswith(("_scale_inv", ".scale")):  # FP8 scales are not parameters
                count += n
            dtypes[t["dtype"]] += n
    return count, dtypes


def _gguf_types(path: Path) -> Counter[str]:
    """Elements per GGUF quantization type (Q4_1, Q8_0, F32, ...)."""
    from gguf import GGUFReader

    types = Counter[str]()
    for t in GGUFReader(path).tensors:
        types[t.tensor_type.name] += int(t.n_elements)
    return types


def _mix(types: Counter[str]) -> str:
    total = sum(types.values()) or 1
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in types.most_common())


def describe(spec: str | None) -> str:
    """A few lines on the model `spec` names (None: the default), as `thrifty show` prints."""
    path = hub.resolve(spec)
    cfg = ModelConfig.from_dir(path)
    params, dtypes = _tensor_stats(path)
    source = hub.converted_source(path) if (path / hub.CONVERTED_MARKER).is_file() else None
    if source is not None and source.is_file():  # the weights are the GGUF's own
        types = _gguf_types(source)
        params = sum(types.values())
        quant = f"{_mix(types)} (GGUF {source}; config and tokenizer in {path})"
    elif cfg.quantization is not None:
        quant = f"FP8 E4M3, 128x128 blocks, {cfg.quantization.scale_fmt} scales ({_mix(dtypes)})"
    else:
        quant = _mix(dtypes)
    try:
        template = Tokenizer.from_dir(path, cfg.eos_token_ids).chat_template
    except ThriftyError as e:
        template = f"(unreadable: {e})"
    defaults = GenerationDefaults.from_dir(path)
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    disk += source.stat().st_size if source is not None and source.is_file() else 0
    attention = "MLA" if cfg.mla else f"{cfg.num_heads} heads, {cfg.num_kv_heads} KV heads"
    lines = [
        f"model         {spec or hub.DEFAULT_MODEL}",
        f"architecture  {cfg.architecture}: {cfg.num_layers} layers, hidden {cfg.hidden_size},"
        f" {attention}{', MoE' if cfg.moe else ''}",
        f"parameters    {params / 1e6:,.1f} M",
        f"quantization  {quant}",
        f"context       {cfg.max_position_embeddings:,} tokens",
        f"vocabulary    {cfg.vocab_size:,} tokens",
        f"sampling      {defaults.describe()} (from {defaults.source})",
        f"disk          {disk / 1e6:,.1f} MB",
        "template",
        *("  " + line for line in template.strip().splitlines()),
    ]
    return "\n".join(lines)
