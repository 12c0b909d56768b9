"""Convert a GGUF file into a Hugging Face-style model directory, once.

The rest of the engine only loads HF directories: after one conversion a GGUF model is config and
tokenizer files built from the GGUF metadata plus a marker naming the GGUF file, whose tensors the
loader reads in place on every load (thrifty/loader/gguf_weights.py): quantized weights stay
quantized, the rest is dequantized exactly, to the values llama.cpp computes with.
"""

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing

from thrifty.config import ModelConfig
from thrifty.errors import ThriftyError
from thrifty.hub import CONVERTED_FORMAT, CONVERTED_MARKER
from thrifty.loader.gguf_table import TableEntry, check_gguf
from thrifty.loader.gguf_weights import GgufTensor

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# llama.cpp's token types (llama_token_type): which vocabulary entries are added tokens.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# Split regexes of the byte-level BPE vocabularies, keyed by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 is Llama 3's split with single digits.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# StarCoder-style vocabularies split every digit off before GPT-2's regex.
_DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact", "codeshell"}
# The original Llama 3 tokenizer, and llama.cpp for it, take a pre-token found whole in the vocab
# as one token even when the merges would not build it.
_IGNORE_MERGES_PRES = {"llama-bpe", "llama3", "llama-v3"}


def convert_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Convert `gguf_path` into an HF model directory at `out_dir` and return `out_dir`.

    Writes config.json, generation_config.json, tokenizer.json, tokenizer_config.json and the
    marker (hub.CONVERTED_MARKER: the GGUF file's path, size and mtime, which the loader reads
    the weights from) into a temporary sibling directory, loads it as the engine would (names and
    shapes, on the meta device), and only then renames it into place: `out_dir` either does not
    exist or is a model that loads. If another process
    finished the same conversion first, its directory is kept. Raises ThriftyError for a corrupt
    or truncated file and for an architecture, tensor or tokenizer it does not support.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    # Everything is validated before the first byte is written.
    table, meta = open_gguf(gguf_path)
    try:
        config = _hf_config(meta, {t.name for t in table})
        hf_tensors(table, np.zeros(0, np.uint8), config)  # every tensor has an HF name
        tokenizer, tokenizer_config = _tokenizer(meta)
    except ThriftyError as e:  # name the file the metadata came from
        raise ThriftyError(f"{gguf_path}: {e}") from None
    generation_config = {"bos_token_id": config["bos_token_id"], "eos_token_id": _stop_ids(meta)}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model cache is not a secret
    try:
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, obj in [
            ("config.json", config),
            ("generation_config.json", generation_config),
            ("tokenizer_config.json", tokenizer_config),
        ]:
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        stat = gguf_path.stat()
        source = {"source": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        marker = source | {"format": CONVERTED_FORMAT}
        (tmp / CONVERTED_MARKER).write_text(json.dumps(marker) + "\n")
        _check_loads(tmp, gguf_path)  # the directory becomes visible only once it loads
        try:
            tmp.rename(out_dir)
        except OSError:
            if not (out_dir / CONVERTED_MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _check_loads(model_dir: Path, gguf_path: Path) -> None:
    """Load the converted directory as the engine will (config, tokenizer, every tensor's name
    and shape; the weights onto the meta device): a conversion that cannot load is never cached."""
    from thrifty.loader.weights import load_model  # torch and the models: only once converted
    from thrifty.tokenizer import Tokenizer

    try:
        cfg = ModelConfig.from_dir(model_dir)
        Tokenizer.from_dir(model_dir, cfg.eos_token_ids)
        load_model(model_dir, cfg, dtype=torch.float32, device="meta", max_positions=1)
    except ThriftyError as e:
        raise ThriftyError(f"{gguf_path}: the converted model does not load: {e}") from None


def open_gguf(path: Path) -> tuple[list[TableEntry], dict[str, Any]]:
    """The file's checked tensor table and its metadata; ThriftyError for a bad file."""
    if not path.is_file():
        raise ThriftyError(f"{path}: no such GGUF file")
    table = check_gguf(path)  # gguf.GGUFReader trusts the tensor table
    try:
        reader = gguf.GGUFReader(path)
        meta = {key: field.contents() for key, field in reader.fields.items()}
    except Exception as e:  # any parse failure means a malformed file; name it in one line
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ThriftyError(f"{path}: not a valid GGUF file (truncated or corrupt: {detail})") from e
    return table, meta


def _hf_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ThriftyError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ThriftyError(f"GGUF metadata is missing {arch}.{key}")
        return value

    def get_f32(key: str, default: Any = None) -> float:
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ThriftyError(f"GGUF metadata {arch}.{key} is not a number: {value!r}")
        return _f32(value)

    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = meta.get(f"{arch}.attention.key_length")
    if head_dim is None and all(isinstance(v, int) and v > 0 for v in (hidden, heads)):
        head_dim = hidden // heads
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": get_f32("attention.layer_norm_rms_epsilon"),
        "rope_theta": get_f32("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length"),
        "vocab_size": get("vocab_size", len(meta.get("tokenizer.ggml.tokens", []))),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if (pad := meta.get("tokenizer.ggml.padding_token_id")) is not None:
        config["pad_token_id"] = pad
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        config["rope_scaling"] = {"rope_type": scaling, "factor": get_f32("rope.scaling.factor")}
        if (original := meta.get(f"{arch}.rope.scaling.original_context_length")) is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = original
    try:  # the sizes the engine will allocate by: positive, and within sane bounds
        ModelConfig.from_hf(config)
    except ThriftyError as e:
        raise ThriftyError(f"GGUF metadata gives a model config thrifty refuses: {e}") from None
    # Layers are built from block_count: it must be the number of blocks the file has tensors of.
    blocks = {int(m[1]) for name in tensor_names if (m := _LAYER_NAME.fullmatch(name))}
    if blocks != set(range(config["num_hidden_layers"])):
        raise ThriftyError(
            f"GGUF {arch}.block_count is {config['num_hidden_layers']:,}, but the file has "
            f"tensors for {len(blocks)} blocks"
        )
    return config


def _f32(value: float) -> float:
    # GGUF stores floats as float32: 1e-5 arrives as 9.99999974e-06. Its shortest float32 spelling
    # is the value the original config.json held.
    return float(str(np.float32(value)))


def _stop_ids(meta: dict[str, Any]) -> int | list[int] | None:
    """EOS, plus end-of-turn/end-of-message tokens when the file names different ones."""
    eos = meta.get("tokenizer.ggml.eos_token_id")
    ids = [eos] if eos is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if (extra := meta.get(key)) is not None and extra not in ids:
            ids.append(extra)
    return ids[0] if len(ids) == 1 else (ids or None)


def _hf_name(name: str) -> str:
    stem, _, suffix = name.rpartition(".")
    if stem in _GLOBAL_TENSORS and suffix == "weight":
        return f"{_GLOBAL_TENSORS[stem]}.weight"
    match = _LAYER_NAME.fullmatch(name)
    if match and match[2] in _LAYER_TENSORS:
        return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.{match[3]}"
    raise ThriftyError(f"GGUF tensor {name!r} has no Hugging Face equivalent here")


def _unpermute_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows for llama models.

    Its converter turns each head's rows from HF's halves layout (x0..x_{d/2-1}, y0..) into
    interleaved pairs (x0, y0, x1, y1, ...); rows are quantized independently, so the inverse on
    the dequantized rows is exact.
    """
    rest = w.shape[1:]
    return w.reshape(num_heads, -1, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(
    table: list[TableEntry], raw: np.ndarray, config: dict[str, Any]
) -> list[tuple[str, GgufTensor]]:
    """(HF name, tensor) in file order, each a view of `raw` (the file's bytes, mmapped; empty
    to check the names only); fails on an unknown tensor before anything is read."""
    heads = {
        "attn_q": config["num_attention_heads"],
        "attn_k": config["num_key_value_heads"],
    }
    plan = []
    for t in table:
        hf_name = _hf_name(t.name)
        shape = torch.Size(reversed(t.dims))  # GGUF lists dims innermost first
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        num_heads = heads.get(kind) if config["model_type"] == "llama" else None
        rows = shape.numel() // shape[-1]
        data = raw[t.start : t.start + t.nbytes].reshape(rows, -1) if len(raw) else raw
        plan.append((hf_name, GgufTensor(t.name, shape, t.tensor_type, data, num_heads)))
    return plan


def _tokenizer(meta: dict[str, Any]) -> tuple[Tokenizer, dict[str, Any]]:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ThriftyError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2', byte-level BPE)"
        )
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise ThriftyError("GGUF metadata has no tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ThriftyError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")

    bpe = models.BPE(
        {token: i for i, token in enumerate(tokens)},
        merges,
        ignore_merges=pre in _IGNORE_MERGES_PRES,
    )
    tok = Tokenizer(bpe)
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:  # GPT-2's own regex, built into ByteLevel; the usual default for byte-level BPE
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre in _DIGIT_SPLIT_PRES:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    if pre.startswith("qwen2"):
        tok.normalizer = normalizers.NFC()  # as in Qwen2's own tokenizer.json
    tok.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>) are matched whole and are special; user-defined ones
    # (<tool_call>) are matched whole but are ordinary text.
    tok.add_special_tokens(
        [
            _added(t, special=True)
            for t, ty in zip(tokens, types, strict=True)
            if ty in (_UNKNOWN, _CONTROL)
        ]
    )
    tok.add_tokens(
        [
            _added(t, special=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _USER_DEFINED
        ]
    )

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, key in [("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")]:
        if (token_id := meta.get(f"tokenizer.ggml.{key}_token_id")) is not None:
            if not 0 <= token_id < len(tokens):
                raise ThriftyError(f"GGUF {name} token id {token_id} is outside the vocabulary")
            config[f"{name}_token"] = tokens[token_id]
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    config["clean_up_tokenization_spaces"] = False
    if (template := meta.get("tokenizer.chat_template")) is not None:
        config["chat_template"] = template

    # tokenizer.json alone must tokenize like llama.cpp, so BOS/EOS insertion lives in it too.
    bos_id = meta.get("tokenizer.ggml.bos_token_id") if config["add_bos_token"] else None
    eos_id = meta.get("tokenizer.ggml.eos_token_id") if config["add_eos_token"] else None
    if bos_id is not None or eos_id is not None:
        tok.post_processor = _bos_eos_template(tokens, bos_id, eos_id)
    return tok, config


def _added(content: str, *, special: bool) -> AddedToken:
    return AddedToken(content, special=special, normalized=False)


def _bos_eos_template(
    tokens: list[str], bos_id: int | None, eos_id: int | None
) -> TemplateProcessing:
    bos = [tokens[bos_id]] if bos_id is not None else []
    eos = [tokens[eos_id]] if eos_id is not None else []
    return TemplateProcessing(
        single=" ".join([*bos, "$A", *eos]),
        pair=" ".join([*bos, "$A", *eos, *bos, "$B:1", *eos]),
        special_tokens=[(tokens[i], i) for i in {bos_id, eos_id} if i is not None],
    )
