"""Issue 18, item 2: a corrupt GGUF tensor table is refused by tensor name, and no conversion
that failed, or that would not load, is kept in the cache or listed by `thrifty models`.

Each case writes a tiny valid GGUF and then breaks one field of its tensor table in place.
"""

from __future__ import annotations

import json

import pytest

from tests.hostile.tiny import patch, tensor_infos, write_tiny_gguf
from thrifty import hub
from thrifty.errors import ThriftyError
from thrifty.loader.gguf import convert_gguf

Q = "blk.0.attn_q.weight"
K = "blk.0.attn_k.weight"
DOWN = "blk.0.ffn_down.weight"


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def refused(path, out_dir, *phrases: str) -> str:
    with pytest.raises(ThriftyError) as e:
        convert_gguf(path, out_dir, progress=False)
    message = str(e.value)
    assert "\n" not in message and path.name in message, message
    for phrase in phrases:
        assert phrase in message, message
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}")]
    return message


def test_the_tiny_gguf_converts(tiny, tmp_path):
    out = convert_gguf(tiny, tmp_path / "out", progress=False)
    marker = json.loads((out / hub.CONVERTED_MARKER).read_text())
    stat = tiny.stat()  # the GGUF the directory's weights are read from, as it was converted
    assert marker == {
        "source": str(tiny),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "format": hub.CONVERTED_FORMAT,
    }


def test_overlapping_offsets(tiny, tmp_path):
    infos = tensor_infos(tiny)
    patch(tiny, infos[K].offset_at, infos[Q].offset)  # k's data now starts where q's does
    message = refused(tiny, tmp_path / "out", "overlaps tensor")
    assert f"'{K}'" in message and f"'{Q}'" in message


def test_offset_that_overflows(tiny, tmp_path):
    # GGUFReader adds the data section's start in uint64: 2^64 - 64 wraps to 64 bytes before it,
    # into the header, and the tensor would read metadata as weights.
    infos = tensor_infos(tiny)
    patch(tiny, infos[Q].offset_at, (1 << 64) - 64)
    refused(tiny, tmp_path / "out", f"GGUF tensor '{Q}'", "18,446,744,073,709,551,552")


def test_offset_past_the_end(tiny, tmp_path):
    infos = tensor_infos(tiny)
    patch(tiny, infos[Q].offset_at, tiny.stat().st_size)
    refused(tiny, tmp_path / "out", f"GGUF tensor '{Q}'", "truncated or corrupt")


def test_misaligned_offset(tiny, tmp_path):
    infos = tensor_infos(tiny)
    patch(tiny, infos[Q].offset_at, infos[Q].offset + 4)
    refused(tiny, tmp_path / "out", f"GGUF tensor '{Q}'", "not a multiple of 32")


def test_zero_dim(tiny, tmp_path):
    infos = tensor_infos(tiny)
    patch(tiny, infos[Q].dims_at, 0)
    refused(tiny, tmp_path / "out", f"GGUF tensor '{Q}'", "each must be positive")


def test_negative_dim(tiny, tmp_path):
    infos = tensor_infos(tiny)
    patch(tiny, infos[Q].dims_at + 8, (1 << 64) - 32)  # -32 as int64
    refused(tiny, tmp_path / "out", f"GGUF tensor '{Q}'", "each must be positive")


def test_rows_not_whole_blocks(tiny, tmp_path):
    # ffn_down's rows hold 48 values; as Q8_0 (blocks of 32) they cannot be whole blocks.
    infos = tensor_infos(tiny)
    assert infos[DOWN].dims[0] == 48
    patch(tiny, infos[DOWN].type_at, 8, size=4)
    refused(tiny, tmp_path / "out", f"GGUF tensor '{DOWN}'", "not a multiple of its type's 32")


def test_unknown_type(tiny, tmp_path):
    infos = tensor_infos(tiny)
    patch(tiny, infos[Q].type_at, 99, size=4)
    refused(tiny, tmp_path / "out", f"GGUF tensor '{Q}'", "unknown type 99")


def test_impossible_tensor_count(tiny, tmp_path):
    patch(tiny, 8, 1 << 40)  # the tensor count follows the magic and the version
    refused(tiny, tmp_path / "out", "1,099,511,627,776 tensors cannot fit")


def test_block_count_beyond_the_tensors(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", block_count=3)
    refused(path, tmp_path / "out", "block_count is 3, but the file has tensors for 2 blocks")


def test_zero_heads(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", head_count=0)
    refused(path, tmp_path / "out", "num_attention_heads must be positive, got 0")


def test_conversion_that_would_not_load(tmp_path):
    # One KV head in the metadata, two in attn_k's rows: every field is sane on its own.
    path = write_tiny_gguf(tmp_path / "tiny.gguf", head_count_kv=1)
    refused(path, tmp_path / "out", "does not load", "'model.layers.0.self_attn.k_proj.weight'")


# --- the cache ---------------------------------------------------------------------------------


def test_corrupt_gguf_leaves_nothing_cached(tiny, home, thrifty):
    infos = tensor_infos(tiny)
    patch(tiny, infos[K].offset_at, infos[Q].offset)
    code, _, err = thrifty("pull", str(tiny))
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and "overlaps" in err[0]
    code, out, _ = thrifty("models")
    assert code == 0 and out.startswith("no models cached")


def test_unloadable_conversion_leaves_nothing_cached(tmp_path, home, thrifty):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", head_count_kv=1)
    code, _, err = thrifty("pull", str(path))  # the conversion's progress bar, then the error
    assert code == 1 and err[-1].startswith("error: ") and "does not load" in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not (home / "converted").exists() or not any((home / "converted").iterdir())
    code, out, _ = thrifty("models")
    assert code == 0 and out.startswith("no models cached")


def test_unmarked_conversion_is_neither_listed_as_good_nor_used(tiny, home, thrifty):
    out = hub.convert(tiny, progress=False)
    (out / hub.CONVERTED_MARKER).unlink()  # as an older thrifty, or a crash, would leave it
    (out / "config.json").write_text("garbage")
    [row] = hub.cached_models()
    assert (row.kind, row.path) == ("unusable", out)
    code, stdout, _ = thrifty("models")
    assert code == 0 and stdout.split()[:2] == [out.name, "unusable"]
    assert hub.convert(tiny, progress=False) == out  # converted again, not used as it was
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert [m.kind for m in hub.cached_models()] == ["converted"]
