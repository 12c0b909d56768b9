"""Issue 18, item 5: nothing is allocated by a size a checkpoint merely claims.

The rotary table follows the context served (--max-model-len, bounded by the KV cache), absurd
layer, head and vocabulary counts are refused in one line before any allocation, and the
tokenizer and config files are read only if they are regular files of a sane size.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.hostile.tiny import write_tiny_gguf, write_tiny_hf
from thrifty import LLM
from thrifty.engine.sampling_params import SamplingParams
from thrifty.files import MAX_FILE_BYTES

HUGE_CONTEXT = 20_000_000  # a 20M-row rotary table would take 1.3 GB and seconds to build


def rotary_rows(llm: LLM) -> int:
    return llm.engine.runner.model.rotary_emb.cos.shape[0]


def test_rotary_table_follows_max_model_len(tmp_path):
    model = write_tiny_hf(tmp_path / "m", max_position_embeddings=HUGE_CONTEXT)
    llm = LLM(str(model), dtype="float32", max_model_len=64, progress=False)
    assert rotary_rows(llm) == 64 and llm.engine.max_model_len == 64
    out = llm.generate([[5, 0, 1]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_rotary_table_is_bounded_by_the_kv_cache(tmp_path):
    model = write_tiny_hf(tmp_path / "m", max_position_embeddings=HUGE_CONTEXT)
    # 2 layers x 2 KV heads x 8 dims x K and V x 4 bytes = 256 bytes a token: 4096 tokens.
    llm = LLM(str(model), dtype="float32", kv_cache_memory_bytes=1 << 20, progress=False)
    assert llm.engine.max_model_len == 4096
    assert rotary_rows(llm) == 4096


def test_rotary_table_reaches_past_max_position_embeddings(tmp_path):
    # A context longer than the model was trained for extrapolates, and must not index past the
    # table (the table used to be max_position_embeddings long whatever was served).
    model = write_tiny_hf(tmp_path / "m", max_position_embeddings=8)
    llm = LLM(str(model), dtype="float32", max_model_len=32, progress=False)
    assert rotary_rows(llm) == 32
    out = llm.generate([[5, 0, 1] * 5], SamplingParams(max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8


@pytest.mark.parametrize(
    ("field", "value", "phrase"),
    [
        ("num_hidden_layers", 1 << 31, "num_hidden_layers is 2,147,483,648, more than the 1,024"),
        ("num_attention_heads", 1 << 20, "num_attention_heads is 1,048,576, more than the 1,024"),
        ("vocab_size", 1 << 40, "vocab_size is 1,099,511,627,776, more than the 4,194,304"),
        ("hidden_size", 1 << 30, "hidden_size is 1,073,741,824, more than the 131,072"),
    ],
)
def test_absurd_sizes_refused_before_allocating(tmp_path, thrifty, field, value, phrase):
    model = write_tiny_hf(tmp_path / "m", **{field: value})
    start = time.perf_counter()
    code, _, err = thrifty("run", str(model), "hi")
    assert time.perf_counter() - start < 5
    assert code == 1 and len(err) == 1 and err[0].startswith("error: "), err
    assert "config.json" in err[0] and phrase in err[0]


def test_absurd_block_count_in_a_gguf(tmp_path, home, thrifty):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", block_count=1 << 31)
    start = time.perf_counter()
    code, _, err = thrifty("run", str(path), "hi")
    assert time.perf_counter() - start < 5
    assert code == 1 and len(err) == 1, err
    assert "tiny.gguf" in err[0] and "num_hidden_layers is 2,147,483,648" in err[0]
    assert not (home / "converted").exists() or not any((home / "converted").iterdir())


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "tokenizer_config.json"])
def test_file_linked_to_dev_zero(tmp_path, thrifty, name):
    model = write_tiny_hf(tmp_path / "m")
    (model / name).unlink()
    (model / name).symlink_to("/dev/zero")
    code, _, err = thrifty("run", str(model), "hi")
    assert code == 1 and err == [f"error: {model / name}: not a regular file"]


@pytest.mark.parametrize(
    "name", ["tokenizer.json", "chat_template.jinja", "generation_config.json"]
)
def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path, thrifty, name):
    model = write_tiny_hf(tmp_path / "m")
    (model / name).unlink(missing_ok=True)
    os.mkfifo(model / name)
    code, _, err = thrifty("run", str(model), "hi")
    assert code == 1 and err == [f"error: {model / name}: not a regular file"]


def test_huge_tokenizer_is_refused_unread(tmp_path, thrifty):
    model = write_tiny_hf(tmp_path / "m")
    with open(model / "tokenizer.json", "r+b") as f:  # sparse: no disk, no reading
        f.truncate(MAX_FILE_BYTES + 1)
    start = time.perf_counter()
    code, _, err = thrifty("run", str(model), "hi")
    assert time.perf_counter() - start < 5
    assert code == 1 and len(err) == 1, err
    assert f"{model / 'tokenizer.json'}: 536,870,913 bytes is more than the 536,870,912" in err[0]
