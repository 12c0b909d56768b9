"""Typed, frozen configs built once at the edge.

`ModelConfig.from_hf` absorbs Hugging Face's config quirks (head_dim fallback, `rope_scaling` vs
`rope_parameters`, tied embeddings, per-family bias and norm flags); nothing deeper reads a raw
`config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from thrifty.errors import ThriftyError
from thrifty.files import present, read_json_object
from thrifty.quant.fp8 import Fp8Config

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
)
DEEPSEEK_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# Upper bounds far beyond any released model (the largest vocabulary today is 262k, the most
# layers 126): a config past them is corrupt or hostile, and is refused before anything sized by
# it is allocated. The context length has none: what it sizes is bounded by the KV cache.
MAX_SIZES = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 10,
    "num_key_value_heads": 1 << 10,
    "head_dim": 1 << 12,
    "kv_lora_rank": 1 << 14,
    "q_lora_rank": 1 << 16,
    "qk_nope_head_dim": 1 << 12,
    "qk_rope_head_dim": 1 << 12,
    "v_head_dim": 1 << 12,
    "n_routed_experts": 1 << 14,
    "num_experts_per_tok": 1 << 14,
    "n_shared_experts": 1 << 10,
    "num_nextn_predict_layers": 1 << 4,
}


def size_field(cfg: dict[str, Any], key: str, default: Any = None, minimum: int = 1) -> int:
    """cfg[key] as a size: an integer from `minimum` (1 or 0) up to MAX_SIZES[key]; `default`
    when absent or null."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise ThriftyError(f"{key} is missing")
        value = default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ThriftyError(f"{key} must be an integer, got {value!r}")
    if value < minimum:
        least = "positive" if minimum else "zero or more"
        raise ThriftyError(f"{key} must be {least}, got {value}")
    limit = MAX_SIZES.get(key)
    if limit is not None and value > limit:
        raise ThriftyError(f"{key} is {value:,}, more than the {limit:,} thrifty accepts")
    return value


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
class MLAConfig:
    """DeepSeek multi-head latent attention: low-rank q and kv, decoupled rope dims."""

    kv_lora_rank: int  # the latent each token caches, shared by all heads
    qk_nope_head_dim: int
    qk_rope_head_dim: int  # the rotary part of q and k; k's is shared by all heads and cached
    v_head_dim: int
    q_lora_rank: int | None = None  # None: q comes from one full-rank projection
    rope_interleave: bool = True  # rotary dims in (x0, x1), (x2, x3) pairs

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeek mixture of experts: routed experts chosen per token, plus shared experts."""

    num_experts: int  # routed experts
    num_experts_per_tok: int
    moe_intermediate_size: int
    num_shared_experts: int = 0
    scoring_func: str = "softmax"  # V2: softmax; V3: sigmoid
    topk_method: str = "greedy"  # greedy | group_limited_greedy (V2) | noaux_tc (V3, biased)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0  # the first k layers keep a dense MLP
    moe_layer_freq: int = 1  # after those, every moe_layer_freq-th layer is MoE

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0


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
    mla: MLAConfig | None = None  # DeepSeek: latent attention instead of GQA
    moe: MoEConfig | None = None  # DeepSeek: mixture-of-experts MLPs
    num_mtp_layers: int = 0  # DeepSeek-V3: multi-token prediction layers after the last layer
    quantization: Fp8Config | None = None  # the checkpoint's FP8 block quantization, if any

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
            hidden = size_field(cfg, "hidden_size")
            num_heads = size_field(cfg, "num_attention_heads")
            num_kv_heads = size_field(cfg, "num_key_value_heads", num_heads)
            if num_heads % num_kv_heads:
                raise ThriftyError(
                    f"num_attention_heads ({num_heads}) is not a multiple of "
                    f"num_key_value_heads ({num_kv_heads})"
                )
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            qwen2 = arch == "Qwen2ForCausalLM"
            return ModelConfig(
                architecture=arch,
                vocab_size=size_field(cfg, "vocab_size"),
                hidden_size=hidden,
                intermediate_size=size_field(cfg, "intermediate_size"),
                num_layers=size_field(cfg, "num_hidden_layers"),
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                head_dim=size_field(cfg, "head_dim", max(hidden // num_heads, 1)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=size_field(cfg, "max_position_embeddings", 2048),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                rope=RopeConfig.from_hf(cfg),
                qkv_bias=qwen2 or bool(cfg.get("attention_bias", False)),
                o_bias=arch == "LlamaForCausalLM" and bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=arch == "Qwen3ForCausalLM",
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                dtype=_parse_dtype(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
                quantization=_quantization_from_hf(cfg.get("quantization_config")),
                **(_deepseek_from_hf(arch, cfg) if arch in DEEPSEEK_ARCHITECTURES else {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ThriftyError(f"malformed model config: {type(e).__name__}: {e}") from None

    @staticmethod
    def from_dir(path: Path) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not present(config_path):
            raise ThriftyError(f"no config.json in {path}")
        cfg = read_json_object(config_path)
        try:
            return ModelConfig.from_hf(cfg)
        except ThriftyError as e:  # name the file: it is what the user has to fix
            raise ThriftyError(f"{config_path}: {e}") from None


def _quantization_from_hf(q: dict[str, Any] | None) -> Fp8Config | None:
    return Fp8Config.from_hf(q) if q else None


def _deepseek_from_hf(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V2/V3 fields. V3 defaults to sigmoid scores with a bias-corrected grouped top-k;
    V2 to softmax. V2 either renormalises the top-k weights or scales them, never both."""
    v3 = arch == "DeepseekV3ForCausalLM"
    mla = MLAConfig(
        kv_lora_rank=size_field(cfg, "kv_lora_rank"),
        qk_nope_head_dim=size_field(cfg, "qk_nope_head_dim"),
        qk_rope_head_dim=size_field(cfg, "qk_rope_head_dim"),
        v_head_dim=size_field(cfg, "v_head_dim"),
        q_lora_rank=size_field(cfg, "q_lora_rank") if cfg.get("q_lora_rank") else None,
        rope_interleave=bool(cfg.get("rope_interleave", True)) if v3 else True,
    )
    moe = None
    if cfg.get("n_routed_experts"):
        norm = bool(cfg.get("norm_topk_prob", v3))
        scaling = float(cfg.get("routed_scaling_factor") or 1.0)
        topk_method = cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy")
        moe = MoEConfig(
            num_experts=size_field(cfg, "n_routed_experts"),
            num_experts_per_tok=size_field(cfg, "num_experts_per_tok"),
            moe_intermediate_size=size_field(cfg, "moe_intermediate_size"),
            num_shared_experts=size_field(cfg, "n_shared_experts", 0, minimum=0),
            scoring_func=cfg.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
            topk_method=topk_method,
            n_group=int(cfg.get("n_group") or 1),
            topk_group=int(cfg.get("topk_group") or 1),
            norm_topk_prob=norm,
            routed_scaling_factor=1.0 if norm and not v3 else scaling,
            first_k_dense_replace=int(cfg.get("first_k_dense_replace") or 0),
            moe_layer_freq=int(cfg.get("moe_layer_freq") or 1),
        )
        if moe.scoring_func not in ("softmax", "sigmoid"):
            raise ThriftyError(f"unsupported MoE scoring_func {moe.scoring_func!r}")
        if topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ThriftyError(f"unsupported MoE topk_method {topk_method!r}")
        if moe.num_experts % moe.n_group:
            raise ThriftyError(f"n_routed_experts {moe.num_experts} is not a multiple of n_group")
    mtp_key = "num_nextn_predict_layers" if "num_nextn_predict_layers" in cfg else "num_mtp_layers"
    mtp = size_field(cfg, mtp_key, 0, minimum=0)
    return {"mla": mla, "moe": moe, "num_mtp_layers": mtp if v3 else 0}


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


def resolve_dtype(name: str | torch.dtype, model_dir: Path, device: str) -> torch.dtype:
    """`parse_dtype`, with "auto" (the default): bfloat16, except float32 for a GGUF model on a
    CPU without AVX-512 BF16. There every bf16 activation is widened to float32 and rounded back
    around each op (slower), and the rounding
    flips SmolLM2's greedy answers; a GGUF's weights stay quantized, so float32 costs no weight
    memory. A dense checkpoint keeps bfloat16 (float32 would double its weights)."""
    if name != "auto":
        return parse_dtype(name)
    from thrifty.kernels.build import cpu_has
    from thrifty.loader.gguf_weights import gguf_source

    on_cpu = device.partition(":")[0] == "cpu"
    if on_cpu and not cpu_has(("avx512_bf16",)) and gguf_source(model_dir) is not None:
        return torch.float32
    return torch.bfloat16


def resolve_kv_cache_dtype(
    name: str | torch.dtype | None, dtype_name: str | torch.dtype, dtype: torch.dtype
) -> torch.dtype | None:
    """--kv-cache-dtype: a dtype as named, or for "auto" (the default) None, the activations'
    dtype, except bfloat16 where `--dtype auto` resolved to float32 (resolve_dtype: a GGUF model
    on a CPU without AVX-512 BF16). That is the cache such a model has on a CPU with it, at half
    float32's bytes a token; rounding keys and values to bfloat16 moved perplexity by 0.07%
    (SmolLM2) and 0.11% (Qwen2.5-Coder-0.5B) on Wikipedia (benchmarks/kv_cache_dtype.py)."""
    if name not in (None, "auto"):
        return parse_dtype(name)
    if dtype_name == "auto" and dtype == torch.float32:
        return torch.bfloat16
    return None


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
    # A prompt with more tokens still to compute is "long": while other sequences run or wait
    # it prefills in chunks of at most this many, one long prompt at a time, after the short
    # ones waiting, so one client's long prompts cannot hold up the others' first tokens
    # (benchmarks/fairness.py: 61 s -> under 2 s on 2 cores); alone, in whole budgets.
    long_prefill_tokens: int = 256
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch intra-op threads on CPU; None: torch's default
    # Self-speculative decoding: tokens drafted per step by the model's MTP layers (DeepSeek-V3);
    # 0: off.
    num_speculative_tokens: int = 0
    # "fp8" / "fp8-all": quantize linear weights on load (UE8M0 scales); -all: the head too
    quantization: str | None = None
    # Ranks that split the model (heads, MLP columns, vocabulary; MoE experts): 1 is one
    # process; more spawns the others, or joins torchrun's (thrifty/engine/ranks.py).
    tensor_parallel_size: int = 1
    # The KV cache's dtype; None: the activations' (dtype). bfloat16 under float32 activations
    # (a GGUF model on a CPU without AVX-512 BF16) halves the cache: twice the tokens in
    # kv_cache_memory_bytes, and half the bytes decode attention reads. Keys and values are
    # rounded once, as they are stored. LLM and the command line resolve their "auto" with
    # resolve_kv_cache_dtype.
    kv_cache_dtype: torch.dtype | None = None

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.kv_cache_dtype or self.dtype

    def __post_init__(self) -> None:
        positive = (
            "block_size", "kv_cache_memory_bytes", "max_num_seqs", "max_num_batched_tokens",
            "long_prefill_tokens", "tensor_parallel_size",
        )  # fmt: skip
        optional = ("num_kv_blocks", "max_model_len", "num_threads")
        for name in positive + optional:
            value = getattr(self, name)
            if name in optional and value is None:
                continue
            if value < 1:  # flags map 1:1 to fields: name the flag
                raise ThriftyError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.num_speculative_tokens < 0:
            raise ThriftyError("num-speculative-tokens must be 0 or more")
        if isinstance(self.kv_cache_dtype, str):  # a name, as LLM(...) and the flags give it
            name = self.kv_cache_dtype
            object.__setattr__(
                self, "kv_cache_dtype", None if name == "auto" else parse_dtype(name)
            )
