"""Tiny synthetic checkpoints for the hostile tests to corrupt, written into tmp_path.

Each builder writes a model that loads and answers; a test then breaks one thing in it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from tests.test_gguf import _gguf_name  # the one HF -> GGUF tensor name table

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 32, 4, 2, 8, 48, 2
TOKENS = ["a", "b", "ab", "Ġ", "Ġab", "<s>", "</s>", "<eot>"]
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": HIDDEN,
    "intermediate_size": FFN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "vocab_size": len(TOKENS),
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 5,
    "eos_token_id": 6,
    "torch_dtype": "float32",
}


def tiny_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named float32 weights of the tiny Llama in CONFIG."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    w = {
        "model.embed_tokens.weight": rand(len(TOKENS), HIDDEN),
        "model.norm.weight": rand(HIDDEN),
        "lm_head.weight": rand(len(TOKENS), HIDDEN),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w |= {
            p + "self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": rand(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": rand(FFN, HIDDEN),
            p + "mlp.up_proj.weight": rand(FFN, HIDDEN),
            p + "mlp.down_proj.weight": rand(HIDDEN, FFN),
            p + "input_layernorm.weight": rand(HIDDEN),
            p + "post_attention_layernorm.weight": rand(HIDDEN),
        }
    return w


def tiny_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(TOKENS)}
    tok = Tokenizer(models.BPE(vocab, [("a", "b"), ("Ġ", "ab")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok


def write_tiny_hf(path: Path, **config: Any) -> Path:
    """A tiny Llama directory: config.json (CONFIG updated by `config`), tokenizer files and
    model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG | config))
    tiny_tokenizer().save(str(path / "tokenizer.json"))
    tokenizer_config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    save_file(tiny_weights(), path / "model.safetensors", metadata={"format": "pt"})
    return path


def write_tiny_gguf(
    path: Path,
    *,
    block_count: int = LAYERS,
    context_length: int = 256,
    head_count: int = HEADS,
    head_count_kv: int = KV_HEADS,
    tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """A tiny llama GGUF (float32 tensors, GGUF names); `tensors` replaces the weights."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(block_count)
    writer.add_context_length(context_length)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(head_count)
    writer.add_head_count_kv(head_count_kv)
    writer.add_key_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([1, 1, 1, 1, 1, 3, 3, 3])
    writer.add_token_merges(["a b", "Ġ ab"])
    writer.add_bos_token_id(5)
    writer.add_eos_token_id(6)
    if tensors is None:
        tensors = {_gguf_name(k): v.numpy() for k, v in tiny_weights().items()}
    for name, w in tensors.items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's info fields sit in a GGUF file, and their values."""

    dims_at: int  # the first of its uint64 dims
    type_at: int  # its uint32 type
    offset_at: int  # its uint64 offset into the data section
    dims: list[int]
    offset: int


def tensor_infos(path: Path) -> dict[str, TensorInfo]:
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        # parts: name length, name, n_dims, dims, type, offset; views into the mapped file
        parts = t.field.parts
        at = [t.field.offset + sum(int(p.nbytes) for p in parts[:i]) for i in range(len(parts))]
        out[t.name] = TensorInfo(at[3], at[4], at[5], parts[3].tolist(), int(parts[5][0]))
    return out


def patch(path: Path, pos: int, value: int, size: int = 8) -> None:
    """Overwrite the little-endian `size`-byte integer at `pos`."""
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(int(value).to_bytes(size, "little"))
