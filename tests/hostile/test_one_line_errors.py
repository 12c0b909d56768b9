"""Issue 18, item 6: hostile inputs end in one `error:` line and exit code 1, never a traceback.

Each case writes the input that used to raise a traceback, then runs the CLI in this process
(`thrifty.cli.main`, what the `thrifty` script runs) or, where the CLI would first load a model,
the function where the input enters.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from tests.hostile.tiny import write_tiny_hf
from thrifty.errors import ThriftyError
from thrifty.tokenizer import Tokenizer


def one_error(result: tuple[int, str, list[str]], *phrases: str) -> str:
    code, _, err = result
    assert code == 1, err
    assert len(err) == 1, err
    assert err[0].startswith("error: "), err
    for phrase in phrases:
        assert phrase in err[0], err
    return err[0]


def safetensors_with_header(path: Path, header: object, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# --- checkpoint files -------------------------------------------------------------------------

MALFORMED_HEADERS = {
    "a list": ([1, 2], "header is not a JSON object"),
    "an entry that is not an object": ({"w": 3}, "tensor 'w'"),
    "no data_offsets": ({"w": {"dtype": "F32", "shape": [2]}}, "tensor 'w'"),
    "negative shape": (
        {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
        "tensor 'w'",
    ),
    "offsets out of order": (
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
        "tensor 'w'",
    ),
    "size not the shape's": (
        {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
        "tensor 'w'",
    ),
    "unknown dtype": ({"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, "'Q9'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_HEADERS))
def test_malformed_safetensors_header(tmp_path, thrifty, case):
    header, phrase = MALFORMED_HEADERS[case]
    model = write_tiny_hf(tmp_path / "m")
    safetensors_with_header(model / "model.safetensors", header, bytes(8))
    one_error(thrifty("run", str(model), "hi"), "model.safetensors", phrase)


@pytest.mark.parametrize(
    ("field", "value", "phrase"),
    [
        ("num_attention_heads", 0, "num_attention_heads must be positive, got 0"),
        ("hidden_size", -32, "hidden_size must be positive, got -32"),
        ("intermediate_size", -1, "intermediate_size must be positive, got -1"),
        ("num_key_value_heads", 3, "num_attention_heads (4) is not a multiple"),
        ("vocab_size", "many", "vocab_size must be an integer"),
    ],
)
def test_bad_sizes_in_config(tmp_path, thrifty, field, value, phrase):
    model = write_tiny_hf(tmp_path / "m", **{field: value})
    one_error(thrifty("run", str(model), "hi"), "config.json", phrase)


def test_config_that_is_a_list(tmp_path, thrifty):
    model = write_tiny_hf(tmp_path / "m")
    (model / "config.json").write_text("[1, 2, 3]")
    one_error(thrifty("run", str(model), "hi"), "config.json", "must hold a JSON object")


def test_config_symlink_loop(tmp_path, thrifty):
    model = write_tiny_hf(tmp_path / "m")
    (model / "config.json").unlink()
    (model / "config.json").symlink_to(model / "config.json")
    one_error(thrifty("run", str(model), "hi"), "config.json", "symbolic links")


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "must hold a JSON object"),
        ('{"bos_token": 5}', "bos_token"),
        ('{"chat_template": 7}', "chat_template"),
        ('{"chat_template": [{"name": "default"}]}', "chat_template"),
    ],
)
def test_bad_tokenizer_config(tmp_path, thrifty, text, phrase):
    model = write_tiny_hf(tmp_path / "m")
    (model / "tokenizer_config.json").write_text(text)
    one_error(thrifty("run", str(model), "hi"), "tokenizer_config.json", phrase)


def test_bad_generation_config(tmp_path, thrifty):
    model = write_tiny_hf(tmp_path / "m")
    (model / "generation_config.json").write_text('{"eos_token_id": "six"}')
    one_error(thrifty("run", str(model), "hi"), "generation_config.json", "eos_token_id")


def test_recursive_template_macro(tmp_path):
    model = write_tiny_hf(tmp_path / "m")
    template = "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}"
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = Tokenizer.from_dir(model)
    with pytest.raises(ThriftyError, match="chat template recursed too deeply") as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value)


# --- pickled weights --------------------------------------------------------------------------


def pickled_model(tmp_path: Path, payload: bytes) -> Path:
    model = write_tiny_hf(tmp_path / "m")
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(payload)
    return model


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_allow_pickle_refuses_code(tmp_path, thrifty):
    path = tmp_path / "evil.bin"
    torch.save({"w": Evil()}, path)
    model = pickled_model(tmp_path, path.read_bytes())
    line = one_error(
        thrifty("run", str(model), "hi", "--allow-pickle"), "pytorch_model.bin", "refused"
    )
    assert "pwned" not in line


@pytest.mark.parametrize(
    "payload", [b"\x80\x04this is not a pickle", pickle.dumps({"w": 1}), b""], ids=str
)
def test_allow_pickle_garbage(tmp_path, thrifty, payload):
    model = pickled_model(tmp_path, payload)
    one_error(thrifty("run", str(model), "hi", "--allow-pickle"), "pytorch_model.bin")


def test_allow_pickle_not_a_state_dict(tmp_path, thrifty):
    path = tmp_path / "list.bin"
    torch.save([torch.zeros(2)], path)
    model = pickled_model(tmp_path, path.read_bytes())
    one_error(thrifty("run", str(model), "hi", "--allow-pickle"), "pytorch_model.bin", "not a dict")


# --- command-line values ----------------------------------------------------------------------


def argparse_error(result: tuple[int, str, list[str]], *phrases: str) -> None:
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("thrifty serve: error: "), err
    for phrase in phrases:
        assert phrase in err[-1], err


def test_serve_port_out_of_range(thrifty):
    argparse_error(
        thrifty("serve", "no/such/model", "--port", "99999"), "--port", "0 to 65535", "99999"
    )


@pytest.mark.parametrize("value", ["-1", "0"])
def test_serve_max_body_bytes_not_positive(thrifty, value):
    argparse_error(
        thrifty("serve", "no/such/model", "--max-body-bytes", value), "--max-body-bytes", "positive"
    )


def test_enormous_kv_cache(tmp_path, thrifty):
    model = write_tiny_hf(tmp_path / "m")
    ten_tb = str(10 << 40)
    line = one_error(
        thrifty("serve", str(model), "--port", "0", "--kv-cache-memory-bytes", ten_tb),
        "KV cache",
        "10,240.0 GiB",
    )
    assert "memory" in line


def test_enormous_kv_cache_from_blocks(tmp_path, thrifty):
    model = write_tiny_hf(tmp_path / "m")
    blocks = str(1 << 40)
    one_error(thrifty("serve", str(model), "--port", "0", "--num-kv-blocks", blocks), "KV cache")


# --- quantize destinations ---------------------------------------------------------------------


def test_quantize_to_a_file(tmp_path, thrifty):
    model = write_tiny_hf(tmp_path / "m")
    dst = tmp_path / "file"
    dst.write_text("x")
    one_error(thrifty("quantize", str(model), str(dst)), str(dst), "is not a directory")
    assert dst.read_text() == "x"


def test_quantize_under_a_file(tmp_path, thrifty):
    model = write_tiny_hf(tmp_path / "m")
    (tmp_path / "file").write_text("x")
    dst = tmp_path / "file" / "out"
    one_error(thrifty("quantize", str(model), str(dst)), str(dst), "cannot create")


def test_quantize_to_a_read_only_place(tmp_path, thrifty):
    # sysfs refuses new directories to every user, root included (chmod would not stop root).
    model = write_tiny_hf(tmp_path / "m")
    one_error(thrifty("quantize", str(model), "/sys/thrifty-out"), "/sys/thrifty-out", "cannot")


def test_quantize_writes_nothing_on_refusal(tmp_path, thrifty):
    model = write_tiny_hf(tmp_path / "m", num_attention_heads=0)
    dst = tmp_path / "out"
    one_error(thrifty("quantize", str(model), str(dst)), "num_attention_heads")
    assert not dst.exists()
