"""Typed, frozen configs built once at the edge.

`ModelConfig.from_hf` absorbs Hugging Face's config quirks (head_dim fallback, `rope_scaling` vs
`rope_parameters`, tied embeddings, per-family bias and norm flags); nothing deeper reads a raw
`config.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from thrifty.errors import ThriftyError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> RopeConfig:
        # transformers 5 writes `rope_parameters` (theta inside); older configs write `rope_theta`
        # beside an optional `rope_scaling` dict whose type key is `rope_type` or `type`.
        params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in ROPE_TYPES:
            raise ThriftyError(
                f"unsupported rope scaling type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})"
            )
        original = params.get("original_max_position_embeddings")
        if rope_type in ("llama3", "yarn") and original is None:
            original = cfg.get(
                "original_max_position_embeddings", cfg.get("max_position_embeddings")
            )
        factor = params.get("factor")
        if factor is None:
            max_pos = cfg.get("max_position_embeddings")
            factor = max_pos / original if rope_type == "yarn" and original and max_pos else 1.0
        return RopeConfig(
            theta=float(theta),
            type=rope_type,
            factor=float(factor),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=original,
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=params.get("attention_factor"),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
            partial_rotary_factor=float(
                params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
            ),
        )


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False  # Qwen2: q, k and v projections carry a bias
    o_bias: bool = False  # Llama's `attention_bias` puts a bias on o_proj too
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before rope
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32  # the checkpoint's own dtype

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ThriftyError(
                f"unsupported architecture {arch!r} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        try:
            num_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            qwen2 = arch == "Qwen2ForCausalLM"
            return ModelConfig(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
                head_dim=int(cfg.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                rope=RopeConfig.from_hf(cfg),
                qkv_bias=qwen2 or bool(cfg.get("attention_bias", False)),
                o_bias=arch == "LlamaForCausalLM" and bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=arch == "Qwen3ForCausalLM",
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                dtype=_parse_dtype(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ThriftyError(f"malformed model config: {type(e).__name__}: {e}") from None

    @staticmethod
    def from_dir(path: Path) -> ModelConfig:
        config_path = Path(path) / "config.json"
        try:
            cfg = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise ThriftyError(f"no config.json in {path}") from None
        except json.JSONDecodeError as e:
            raise ThriftyError(f"{config_path} is not valid JSON: {e}") from None
        return ModelConfig.from_hf(cfg)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    return DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Parse a user-given dtype name ("bf16", "bfloat16", "fp32", ...)."""
    if isinstance(name, torch.dtype):
        return name
    aliases = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ThriftyError(f"unknown dtype {name!r} (choose from bfloat16, float32, float16)")
    return DTYPES[key]


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model: memory, batching and the device."""

    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"
    block_size: int = 16  # tokens per KV-cache block
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory_bytes
    kv_cache_memory_bytes: int = 1 << 30
    max_num_seqs: int = 64  # sequences decoded together in one step
    max_num_batched_tokens: int = 2048  # tokens in one forward pass (prefill chunk budget)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch intra-op threads on CPU; None: torch's default
