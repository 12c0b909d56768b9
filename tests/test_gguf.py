"""thrifty.loader.gguf: GGUF -> HF directory (config, tokenizer and a marker; the weights are read
from the GGUF itself), checked against transformers' own GGUF loading.

The real SmolLM2 (llama, Q4_1/Q8_0) and Qwen2.5-Coder (qwen2, Q4_K/Q5_0/Q6_K/Q8_0) files are
converted once per session; tiny synthetic GGUFs cover the rope un-permutation, Qwen3 names and
every failure path.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from thrifty import hub
from thrifty.errors import ThriftyError
from thrifty.loader.checkpoint import iter_tensors
from thrifty.loader.gguf import convert_gguf
from thrifty.loader.gguf_table import check_gguf
from thrifty.loader.gguf_weights import GgufTensor
from thrifty.quant import ggml

SMOL = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"

TEXTS = [
    "Hello, world! How's it going? I'm fine, they'll see.",
    "Le cœur a ses raisons que la raison ne connaît point. Déjà vu, garçon, où êtes-vous ?",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "def f(x):\n\tif x:\n\t\treturn  x   *  2\n\n\n    # done\r\n}",
    "12345678 and 3.14159 on 2024-01-01, +33 6 12 34 56 78",
    "emoji 🤗🚀👍🏽 and math ∑∫√ and ｆｕｌｌ width",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "  leading and trailing spaces   ",
    "x  2 and y   34",
    '<tool_call>{"name": "f"}</tool_call><|endoftext|>',
    "",
]


@dataclass
class Converted:
    gguf_path: Path
    out_dir: Path


@pytest.fixture(scope="module", params=[SMOL, QWEN])
def converted(request) -> Converted:
    """The registry model as the engine sees it: pulled, then converted into the cache."""
    gguf_path = hub.pull(request.param, progress=False)
    return Converted(gguf_path, hub.resolve(request.param, progress=False))


@pytest.fixture(scope="module")
def reference(converted, transformers_gguf):
    """transformers' model loaded straight from the same GGUF: the reference for every weight."""
    return transformers_gguf(converted.gguf_path)


@pytest.fixture(scope="module")
def reference_tokenizer(converted):
    """transformers' tokenizer built from the same GGUF (its vocab, merges and added tokens).

    For SmolLM2 its pre-tokenizer is corrected: transformers gives a `smollm` GGUF GPT-2's plain
    byte-level split, while SmolLM2's own tokenizer.json and llama.cpp split off every digit
    first. They differ on spaces before a digit: "x  2" is "x", "ĠĠ", "2", not "x", "Ġ", "Ġ", "2".
    """
    tokenizer = AutoTokenizer.from_pretrained(
        converted.gguf_path.parent, gguf_file=converted.gguf_path.name
    )
    if converted.gguf_path.name.startswith("SmolLM2"):
        backend = tokenizer.backend_tokenizer
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer]
        )
    return tokenizer


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# --- real models against transformers ---------------------------------------------------------


@pytest.mark.slow
def test_directory_is_complete(converted):
    names = sorted(p.name for p in converted.out_dir.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "thrifty-converted.json",  # the marker: written last, once the conversion loads
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    # Nothing left behind beside it: the temporary directory was renamed into place.
    leftovers = [p.name for p in converted.out_dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    marker = _read_json(converted.out_dir / "thrifty-converted.json")
    stat = converted.gguf_path.stat()
    assert marker == {
        "source": str(converted.gguf_path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "format": hub.CONVERTED_FORMAT,
    }


@pytest.mark.slow
def test_config_matches_transformers(converted, reference):
    ours, ref = _read_json(converted.out_dir / "config.json"), reference.config
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ]:
        assert ours[key] == getattr(ref, key), key
    # transformers' Qwen2 config has no head_dim when it is hidden_size // num_attention_heads.
    head_dim = getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads
    assert ours["head_dim"] == head_dim
    assert np.float32(ours["rms_norm_eps"]) == np.float32(ref.rms_norm_eps)
    assert ours["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert ours["model_type"] == ref.model_type
    assert ours["architectures"] == [type(reference).__name__]
    assert ours["torch_dtype"] == "float32"
    assert ours["tie_word_embeddings"] is (converted.gguf_path.name.startswith("SmolLM2"))
    generation = _read_json(converted.out_dir / "generation_config.json")
    assert generation == {"bos_token_id": ref.bos_token_id, "eos_token_id": ref.eos_token_id}


@pytest.mark.slow
def test_every_tensor_equals_transformers(converted, reference):
    expected = reference.state_dict()
    ours = dict(iter_tensors(converted.out_dir, gguf_quantized=True))
    tied = {"lm_head.weight"} if reference.config.tie_word_embeddings else set()
    assert set(ours) == set(expected) - tied
    native = 0
    for name, tensor in sorted(ours.items()):
        if isinstance(tensor, GgufTensor):  # kept quantized: repacked, then un-permuted rows
            native += 1
            assert torch.equal(ggml.dequantize(*tensor.quantized()), expected[name]), name
            tensor = tensor.dequantize()
        assert tensor.dtype == torch.float32, name
        # Exact: the same dequantization, and for llama q/k the same un-permutation.
        assert torch.equal(tensor, expected[name]), name
    assert native == sum(len(t.shape) == 2 for t in expected.values()) - len(tied)


@pytest.mark.slow
def test_converted_directory_loads_in_transformers(converted, reference):
    """config.json is complete: transformers built from it, with the weights thrifty reads,
    computes the same logits."""
    config = AutoConfig.from_pretrained(converted.out_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(dict(iter_tensors(converted.out_dir)), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[1, 420, 3037, 314, 260, 1757, 30, 198, 28, 42]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_tokenizer_matches_transformers(converted, reference_tokenizer):
    ours = Tokenizer.from_file(str(converted.out_dir / "tokenizer.json"))
    assert ours.get_vocab_size() == len(reference_tokenizer)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == reference_tokenizer(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids, skip_special_tokens=False) == reference_tokenizer.decode(ids)
    if converted.gguf_path.name.startswith("SmolLM2"):
        assert ours.encode("x  2").tokens == ["x", "ĠĠ", "2"]  # see reference_tokenizer
    if converted.gguf_path.name.startswith("Qwen"):
        # Qwen2's own tokenizer.json normalizes to NFC; transformers' GGUF tokenizer does not.
        assert ours.encode("cafe\u0301").ids == ours.encode("café").ids
    # Control tokens are special (dropped by skip_special_tokens); text is not.
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ours.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.slow
def test_tokenizer_config(converted, reference_tokenizer):
    config = _read_json(converted.out_dir / "tokenizer_config.json")
    for name in ["bos_token", "eos_token", "pad_token"]:
        assert config[name] == getattr(reference_tokenizer, name), name
    assert config["add_bos_token"] is False
    assert config["chat_template"] == reference_tokenizer.chat_template
    # The directory is a usable HF tokenizer on its own, chat template included.
    loaded = AutoTokenizer.from_pretrained(converted.out_dir)
    chat = [{"role": "user", "content": "What is 2+2?"}]
    ours = loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ref = reference_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours == ref and "<|im_start|>user\nWhat is 2+2?<|im_end|>" in ours
    assert loaded(ours)["input_ids"] == reference_tokenizer(ref)["input_ids"]


# --- corrupt files ------------------------------------------------------------------------------


def _assert_one_line_error(path: Path, out_dir: Path, match: str) -> None:
    with pytest.raises(ThriftyError, match=match) as e:
        convert_gguf(path, out_dir, progress=False)
    message = str(e.value)
    assert "\n" not in message and path.name in message
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}")]


@pytest.mark.slow
@pytest.mark.parametrize("keep", ["1mb", "half"])
def test_truncated_file(tmp_path, keep):
    source = hub.pull(SMOL, progress=False)
    size = 1 << 20 if keep == "1mb" else source.stat().st_size // 2
    cut = tmp_path / "cut.gguf"
    with open(source, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(size))
    _assert_one_line_error(cut, tmp_path / "out", "truncated")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    _assert_one_line_error(path, tmp_path / "out", "not a valid GGUF file")


def test_empty_and_missing_file(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _assert_one_line_error(empty, tmp_path / "out", "not a valid GGUF file")
    _assert_one_line_error(tmp_path / "missing.gguf", tmp_path / "out", "no such GGUF file")


# --- tiny synthetic GGUFs ---------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 32, 4, 2, 8, 48, 8


def _rope_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows: halves -> interleaved pairs per head."""
    return w.reshape(num_heads, 2, -1, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_hf_weights(arch: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    w = {
        "model.embed_tokens.weight": rand(VOCAB, HIDDEN),
        "model.norm.weight": rand(HIDDEN),
        "lm_head.weight": rand(VOCAB, HIDDEN),
    }
    for i in range(2):
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
        if arch == "qwen3":
            w[p + "self_attn.q_norm.weight"] = rand(HEAD_DIM)
            w[p + "self_attn.k_norm.weight"] = rand(HEAD_DIM)
    return w


def _gguf_name(hf_name: str) -> str:
    renames = {
        "model.embed_tokens": "token_embd",
        "model.norm": "output_norm",
        "lm_head": "output",
        "model.layers.": "blk.",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "post_attention_layernorm": "ffn_norm",
        "input_layernorm": "attn_norm",
    }
    for old, new in renames.items():
        hf_name = hf_name.replace(old, new)
    return hf_name


def _write_tiny_gguf(
    path: Path,
    arch: str,
    weights: dict[str, np.ndarray],
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(4.0)
    writer.add_rope_scaling_orig_ctx_len(64)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(["a", "b", "ab", "Ġ", "Ġab", "<s>", "</s>", "<eot>"])
    writer.add_token_types([1, 1, 1, 1, 1, 3, 3, 3])
    writer.add_token_merges(["a b", "Ġ ab"])
    writer.add_bos_token_id(5)
    writer.add_eos_token_id(6)
    writer.add_eot_token_id(7)
    writer.add_add_bos_token(True)
    for hf_name, w in weights.items():
        name = _gguf_name(hf_name)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _rope_permute(w, HEADS if "attn_q" in name else KV_HEADS)
        if w.ndim == 2 and name.startswith("blk.0.ffn"):  # exercise a half-precision tensor
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, w)
    for name, w in (extra or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_round_trip(tmp_path, arch):
    """HF weights -> llama.cpp layout (q/k permuted for llama) -> GGUF -> ours: HF weights back."""
    weights = _tiny_hf_weights(arch, np.random.default_rng(0))
    _write_tiny_gguf(tmp_path / "tiny.gguf", arch, weights)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)

    tensors = dict(iter_tensors(out))
    assert set(tensors) == set(weights)
    for name, expected in weights.items():
        if name.startswith("model.layers.0.mlp."):
            expected = expected.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(tensors[name].numpy(), expected, err_msg=name)

    config = _read_json(out / "config.json")
    assert config["architectures"] == [
        {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    ]
    assert config["head_dim"] == HEAD_DIM and config["num_key_value_heads"] == KV_HEADS
    assert config["tie_word_embeddings"] is False and config["attention_bias"] is False
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    assert config["vocab_size"] == VOCAB
    assert _read_json(out / "generation_config.json") == {"bos_token_id": 5, "eos_token_id": [6, 7]}

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    # add_bos_token lives in tokenizer.json's post-processor, like an HF Llama 3 tokenizer.
    assert tokenizer.encode("ab ab</s>").tokens == ["<s>", "ab", "Ġab", "</s>"]
    assert tokenizer.encode("ab", add_special_tokens=False).ids == [2]
    assert _read_json(out / "tokenizer_config.json")["add_bos_token"] is True


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ThriftyError, match="'mamba' is not supported") as e:
        convert_gguf(path, tmp_path / "out", progress=False)
    assert "llama" in str(e.value) and "qwen2" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_unknown_tensor_leaves_nothing_behind(tmp_path):
    weights = _tiny_hf_weights("llama", np.random.default_rng(1))
    extra = {"rope_freqs.weight": np.ones(HEAD_DIM // 2, dtype=np.float32)}
    _write_tiny_gguf(tmp_path / "tiny.gguf", "llama", weights, extra)
    with pytest.raises(ThriftyError, match="'rope_freqs.weight'"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "cache" / "out", progress=False)
    assert not (tmp_path / "cache").exists()  # validated before anything was written


def test_existing_conversion_is_kept(tmp_path):
    """Two processes converting the same file: the loser keeps the winner's directory."""
    weights = _tiny_hf_weights("qwen3", np.random.default_rng(2))
    _write_tiny_gguf(tmp_path / "tiny.gguf", "qwen3", weights)
    first = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    marker = first / hub.CONVERTED_MARKER
    before = marker.stat().st_mtime_ns
    assert convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False) == first
    assert marker.stat().st_mtime_ns == before
    assert sorted(os.listdir(tmp_path)) == ["out", "tiny.gguf"]


def _vocabulary_gguf(path, strings: list[bytes], count: int, lengths: list[int] | None = None):
    """A GGUF of one metadata entry, an array of `count` strings (written: `strings`, with
    `lengths` as their length fields where given), and no tensors."""
    lengths = lengths or [len(s) for s in strings]
    key = b"tokenizer.ggml.tokens"
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    data += struct.pack("<IIQ", 9, 8, count)
    data += b"".join(struct.pack("<Q", n) + s for n, s in zip(lengths, strings, strict=True))
    path.write_bytes(data)
    return path


def test_vocabulary_strings_are_bounded(tmp_path):
    # The header check walks a vocabulary's strings in one loop (check_gguf); each length is
    # still held to the file's end.
    words = [b"a", b"bcdefghijk", b"", b"def"]  # long enough that 5 strings could fit
    assert check_gguf(_vocabulary_gguf(tmp_path / "ok.gguf", words, 4)) == []
    for name, count, lengths in [
        ("long.gguf", 4, [1, 10**6, 0, 3]),  # a length past the end
        ("more.gguf", 5, None),  # one string more than the file holds
    ]:
        with pytest.raises(
            ThriftyError, match="strings of key 'tokenizer.ggml.tokens' run past the end"
        ):
            check_gguf(_vocabulary_gguf(tmp_path / name, words, count, lengths))
