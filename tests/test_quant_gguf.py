"""Native GGUF-quantized execution: repacking, kernels and loading, each against a reference.

The repacked formats dequantize to exactly gguf's own values for every native type; the compiled
GEMV and panel GEMM equal the pure-torch reference (dequantize + F.linear in float32); a tiny
random Llama and Qwen2 written as GGUF with mixed quantized types load natively and give
transformers' logits on the same file, in prefill and in token-by-token decode.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from thrifty import hub
from thrifty import kernels as bf16_kernels
from thrifty.config import EngineConfig, ModelConfig
from thrifty.engine.model_runner import ModelRunner
from thrifty.kernels import ggml as kernels
from thrifty.loader.gguf import convert_gguf
from thrifty.loader.gguf_weights import _merge, dequantize_model
from thrifty.loader.weights import load_model
from thrifty.models import llama
from thrifty.models.attention import build_metadata, forward_context
from thrifty.models.layers import linear
from thrifty.quant import ggml

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K]
FORMATS = {
    T.Q4_0: ("q4", 32),
    T.Q4_1: ("q4", 32),
    T.Q5_0: ("q5", 32),
    T.Q5_1: ("q5", 32),
    T.Q8_0: ("q8", 32),
    T.Q4_K: ("q4", 32),
    T.Q6_K: ("q8", 16),
}
# Where each type keeps its float16 scales inside a block (the other bytes are any bits).
_F16_FIELDS = {T.Q4_K: (0, 2), T.Q6_K: (208,), T.Q4_1: (0, 2), T.Q5_1: (0, 2)}


def _blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator, d: float = 0.01):
    """GGUF bytes for a (rows, cols) tensor: gguf's quantizer where it has one (0-5 bit types
    and Q8_0), else random bits with finite, small float16 scales (K-quants)."""
    if qtype not in (T.Q4_K, T.Q6_K):
        return gguf_quantize(rng.standard_normal((rows, cols)).astype(np.float32) * d * 10, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    for at in _F16_FIELDS.get(qtype, (0,)):
        scale = (rng.uniform(0.5, 1.5, len(blocks)) * d).astype(np.float16)
        blocks[:, at : at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw


@pytest.fixture(scope="module")
def compiled():
    if not kernels.available():
        pytest.skip("the compiled GGUF kernels do not run on this CPU")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_repack_dequantizes_to_ggufs_values(qtype):
    rng = np.random.default_rng(0)
    raw = _blocks(qtype, 7, 512, rng)
    weight, scale = ggml.repack(raw, qtype, (7, 512))
    assert ggml.format_of(weight, scale) == FORMATS[qtype]
    expected = torch.from_numpy(gguf_dequantize(raw, qtype).reshape(7, 512))
    assert torch.equal(ggml.dequantize(weight, scale), expected)
    # The file's float16 scales stay float16 (Q4_0's and Q5_0's m as well); a K-quant's d * sc
    # is float32. Bytes per weight: the file's, or its m besides; a K-quant's half as many again.
    k_quant = qtype in (T.Q4_K, T.Q6_K)
    assert scale.dtype == (torch.float32 if k_quant else torch.float16)
    file_bytes = raw.nbytes
    ours = weight.numel() * weight.element_size() + scale.numel() * scale.element_size()
    assert ours <= (1.55 if k_quant else 1.12) * file_bytes


def test_an_offset_float16_cannot_hold_keeps_float32():
    """Q5_0's m = -16 d overflows float16 for d above 4095: both scales are then float32."""
    raw = _blocks(T.Q5_0, 2, 64, np.random.default_rng(1))
    blocks = raw.reshape(-1, 22)
    blocks[0, 0:2] = np.array([5000.0], np.float16).view(np.uint8)
    weight, scale = ggml.repack(raw, T.Q5_0, (2, 64))
    assert scale.dtype == torch.float32 and scale[0, 1, 0] == -80000.0
    expected = torch.from_numpy(gguf_dequantize(raw, T.Q5_0).reshape(2, 64))
    assert torch.equal(ggml.dequantize(weight, scale), expected)


def test_shards_with_float16_and_float32_scales_merge_exactly():
    """Q5_0 beside Q6_K (q/k beside v, as Qwen's files mix them): both as q8 in groups of 16,
    the float16 scales widened to float32 for the merged weight."""
    rng = np.random.default_rng(2)
    pairs = [ggml.repack(_blocks(t, 4, 256, rng), t, (4, 256)) for t in (T.Q5_0, T.Q6_K)]
    weight, scale = _merge(pairs)
    assert ggml.format_of(weight, scale) == ("q8", 16) and scale.dtype == torch.float32
    want = torch.cat([ggml.dequantize(w, s) for w, s in pairs])
    assert torch.equal(ggml.dequantize(weight, scale), want)


def test_types_without_a_native_format_are_refused():
    assert ggml.repack(np.zeros((2, 176), np.uint8), T.Q5_K, (2, 256)) is None
    with pytest.raises(ValueError, match="no GGUF format"):
        ggml.format_of(torch.zeros(4, 10, dtype=torch.uint8), torch.zeros(4, 2, 1))


def _scales(scale: torch.Tensor, kind: str) -> torch.Tensor:
    """The repacked scales as the file has them, or widened to float32 (what the AVX-512
    build reads): the kernels read both."""
    return scale.float() if kind == "float32" or not kernels.takes_half_scales() else scale


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 5, 17])
@pytest.mark.parametrize("scales", ["file", "float32"])
def test_kernels_equal_the_reference(compiled, qtype, dtype, rows, scales):
    rng = np.random.default_rng(rows)
    n, k = 37, 768  # a partial tile of output rows; K: an odd number of 256-blocks
    weight, scale = ggml.repack(_blocks(qtype, n, k, rng), qtype, (n, k))
    scale = _scales(scale, scales)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    w32 = ggml.dequantize(weight, scale)
    for b in (None, bias):
        want = kernels.reference_gemv(x, weight, scale, b)  # x rounded to int16 where it is
        got = kernels.gemv(x, weight, scale, b)
        assert got.dtype == dtype and got.shape == (rows, n)
        # The GEMV sums in float32 in another order: float32 noise, then one rounding of x's.
        tol = 2e-5 * float(want.float().abs().max()) + 1e-6
        if dtype == torch.bfloat16:
            tol = max(tol, float(want.float().abs().max()) * 2**-8)
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)
        if kernels.i16_rows():  # AVX2's int16 GEMM: the GEMV's numbers, blocked for many rows
            got = kernels.gemm_i16(x, weight, scale, b)
            assert got.dtype == dtype and got.shape == (rows, n)
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)
        # The panel GEMM runs torch's matmul on W dequantized into x's dtype.
        panel = F.linear(x.float(), w32.to(dtype).float(), None if b is None else b.float())
        torch.testing.assert_close(
            kernels.gemm(x, weight, scale, b).float(), panel.to(dtype).float(), atol=tol, rtol=0
        )
    # Any leading shape; the one dispatch the models use picks GEMV or GEMM by rows.
    x3 = x.reshape(1, rows, k)
    torch.testing.assert_close(
        linear(x3, weight, bias, scale).float(),
        kernels.linear(x, weight, scale, bias).reshape(1, rows, n).float(),
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_0, T.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("scales", ["file", "float32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_row_of_x_with_partial_blocks(compiled, qtype, scales, dtype):
    """The batch-1 GEMV takes output rows 4 at a time, x's group sums 8 (AVX2) or 16 (AVX-512)
    groups at a time and, with bf16 x on AVX-512, groups in pairs: 6 rows (one block and 2 left)
    by 11 groups (8 and 3 left; 5 pairs and a half) meet every tail."""
    n, k = 6, 11 * 32
    weight, scale = ggml.repack(_blocks(qtype, n, k, np.random.default_rng(0)), qtype, (n, k))
    scale = _scales(scale, scales)
    g = torch.Generator().manual_seed(0)
    x, bias = torch.randn(1, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    for b in (None, bias):
        want = kernels.reference_gemv(x, weight, scale, b).float()
        tol = 2e-5 * float(want.abs().max()) + 1e-6
        if dtype == torch.bfloat16:  # and one rounding of y to bf16
            tol = max(tol, float(want.abs().max()) * 2**-8)
        got = kernels.gemv(x, weight, scale, b)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=0)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_rows_and_dequantize(compiled, qtype, dtype):
    weight, scale = ggml.repack(_blocks(qtype, 50, 256, np.random.default_rng(3)), qtype, (50, 256))
    if not kernels.takes_half_scales():
        scale = scale.float()
    ids = torch.tensor([[3, 49, 0], [3, 7, 12]])
    want = ggml.dequantize(weight, scale)[ids].to(dtype)
    assert torch.equal(kernels.embedding(ids, weight, scale, dtype), want)
    assert torch.equal(ggml.embedding(ids, weight, scale, dtype), want)
    assert torch.equal(
        kernels.dequantize(weight, scale, dtype), ggml.dequantize(weight, scale, dtype)
    )


def test_as_q8_is_exact_or_refused():
    rng = np.random.default_rng(4)
    for qtype in (T.Q4_0, T.Q5_0, T.Q8_0, T.Q6_K):
        weight, scale = ggml.repack(_blocks(qtype, 5, 256, rng), qtype, (5, 256))
        q8 = ggml.as_q8(weight, scale, 16)
        assert q8 is not None and ggml.format_of(*q8) == ("q8", 16)
        assert torch.equal(ggml.dequantize(*q8), ggml.dequantize(weight, scale))
    for qtype in (T.Q4_1, T.Q4_K):  # a free offset m has no q8 form
        weight, scale = ggml.repack(_blocks(qtype, 5, 256, rng), qtype, (5, 256))
        assert ggml.as_q8(weight, scale, 32) is None


# --- q4 / q5 in panels of 16 rows (csrc/ggml_panels.h) ---------------------------------------

PANEL_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K]


def _panel_cols(qtype: T) -> int:
    return 768 if qtype == T.Q4_K else 352  # whole 256-blocks; else 11 groups of 32


@pytest.mark.parametrize("qtype", PANEL_TYPES, ids=lambda t: t.name)
def test_panels_hold_the_same_weights(compiled, qtype):
    n, k = 48, _panel_cols(qtype)  # 3 panels
    weight, scale = ggml.repack(_blocks(qtype, n, k, np.random.default_rng(5)), qtype, (n, k))
    panels = ggml.to_panels(weight, scale)
    fmt = FORMATS[qtype][0] + "p"
    assert ggml.format_of(*panels) == (fmt, 32)
    assert (ggml.in_features(*panels), ggml.out_features(*panels)) == (k, n)
    assert panels[1].dtype == scale.dtype  # float16 where the file's are, kept
    assert torch.equal(ggml.dequantize(*panels), ggml.dequantize(weight, scale))
    if kernels.takes_panels():  # the compiled layout, byte for byte
        native = kernels.to_panels(weight, scale)
        assert torch.equal(native[0], panels[0]) and torch.equal(native[1], panels[1])


def test_only_q4_and_q5_in_sixteens_go_in_panels():
    rng = np.random.default_rng(6)
    q8 = ggml.repack(_blocks(T.Q8_0, 16, 64, rng), T.Q8_0, (16, 64))
    q4 = ggml.repack(_blocks(T.Q4_0, 24, 64, rng), T.Q4_0, (24, 64))
    for weight, scale in (q8, q4):
        assert not ggml.fits_panels(weight, scale)
        with pytest.raises(ValueError, match="sixteens"):
            ggml.to_panels(weight, scale)
    weight, scale = ggml.to_panels(*ggml.repack(_blocks(T.Q4_0, 16, 64, rng), T.Q4_0, (16, 64)))
    with pytest.raises(ValueError, match="panel format"):
        ggml.format_of(weight[:, :-1], scale)


@pytest.fixture(scope="module")
def panel_kernels(compiled):
    if not kernels.takes_panels():
        pytest.skip("the panel kernel needs AVX-512 BF16")


@pytest.mark.parametrize("qtype", PANEL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("scales", ["file", "float32"])
def test_the_panel_kernel_equals_the_reference(panel_kernels, qtype, scales):
    n, k = 80, _panel_cols(qtype)  # 5 panels: pairs of panels and one left over
    rng = np.random.default_rng(7)
    weight, scale = ggml.repack(_blocks(qtype, n, k, rng), qtype, (n, k))
    weight, scale = ggml.to_panels(weight, scale.float() if scales == "float32" else scale)
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(n, generator=g).bfloat16()
    # 1-64 rows: the panel kernel, 4 rows of x at a time and the rest; beyond, dequantized
    # panels through torch's matmul.
    for rows in (1, 2, 3, 4, 5, 9, 64, 65, 130):
        x = torch.randn(rows, k, generator=g).bfloat16()
        for b in (None, bias):
            want = ggml.reference_linear(x, weight, scale, b).float()
            got = kernels.linear(x, weight, scale, b)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
            # float32 sums in another order, then one rounding to bf16 (of the weights too,
            # beyond 64 rows)
            tol = float(want.abs().max()) * (2**-7 if rows > 64 else 2**-8)
            torch.testing.assert_close(got.float(), want, atol=tol, rtol=0)
    # float32 x goes to the reference (the kernel takes bf16)
    x = torch.randn(3, k, generator=g)
    torch.testing.assert_close(
        kernels.linear(x, weight, scale, None),
        ggml.reference_linear(x, weight, scale),
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_0], ids=lambda t: t.name)
def test_the_panel_kernel_gives_a_row_the_same_output_alone_or_in_a_batch(panel_kernels, qtype):
    n, k = 48, 256
    weight, scale = ggml.to_panels(
        *ggml.repack(_blocks(qtype, n, k, np.random.default_rng(8)), qtype, (n, k))
    )
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(8)).bfloat16()
    alone = torch.cat([kernels.linear(x[i : i + 1], weight, scale, None) for i in range(64)])
    for rows in (2, 3, 5, 8, 64):
        assert torch.equal(kernels.linear(x[:rows], weight, scale, None), alone[:rows])


# --- tiny random models written as GGUF, against transformers on the same file ---------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 256, 4, 2, 64, 512, 96
# Mixed types, as real files mix them: layer 0's q/k/v cannot share a format (Q4_K beside Q6_K:
# dequantized), layer 1's share q8 (Q5_0 and Q8_0), and every native type appears.
LAYER_TYPES = [
    {"attn_q": T.Q4_K, "attn_k": T.Q4_K, "attn_v": T.Q6_K, "attn_output": T.Q5_1,
     "ffn_gate": T.Q4_1, "ffn_up": T.Q4_1, "ffn_down": T.Q6_K},
    {"attn_q": T.Q5_0, "attn_k": T.Q5_0, "attn_v": T.Q8_0, "attn_output": T.Q4_0,
     "ffn_gate": T.Q5_0, "ffn_up": T.Q5_0, "ffn_down": T.Q4_K},
]  # fmt: skip


def _write_tiny_gguf(path, arch: str, rng: np.random.Generator) -> None:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(len(LAYER_TYPES))
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "llama-bpe")
    tokens = ["a", "b", "ab", "Ġ", "Ġab", "<s>", "</s>"] + [f"t{i}" for i in range(VOCAB - 7)]
    writer.add_token_list(tokens)
    writer.add_token_types([1, 1, 1, 1, 1, 3, 3] + [1] * (VOCAB - 7))
    writer.add_token_merges(["a b", "Ġ ab"])
    writer.add_bos_token_id(5)
    writer.add_eos_token_id(6)

    def add(name: str, qtype: T, rows: int, cols: int, d: float = 0.01) -> None:
        raw = _blocks(qtype, rows, cols, rng, d)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)

    def vector(name: str, n: int, center: float) -> None:
        writer.add_tensor(name, (center + 0.1 * rng.standard_normal(n)).astype(np.float32))

    add("token_embd.weight", T.Q8_0, VOCAB, HIDDEN, d=0.05)
    add("output.weight", T.Q5_0, VOCAB, HIDDEN)
    vector("output_norm.weight", HIDDEN, 1.0)
    for i, types in enumerate(LAYER_TYPES):
        shapes = {
            "attn_q": (HEADS * HEAD_DIM, HIDDEN),
            "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
            "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
            "attn_output": (HIDDEN, HEADS * HEAD_DIM),
            "ffn_gate": (FFN, HIDDEN),
            "ffn_up": (FFN, HIDDEN),
            "ffn_down": (HIDDEN, FFN),
        }
        for kind, (rows, cols) in shapes.items():
            add(
                f"blk.{i}.{kind}.weight",
                types[kind],
                rows,
                cols,
                d=0.004 if "K" in types[kind].name else 0.01,
            )
        if arch == "qwen2":
            for kind in ("attn_q", "attn_k", "attn_v"):
                vector(f"blk.{i}.{kind}.bias", shapes[kind][0], 0.0)
        vector(f"blk.{i}.attn_norm.weight", HIDDEN, 1.0)
        vector(f"blk.{i}.ffn_norm.weight", HIDDEN, 1.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory, transformers_gguf):
    tmp = tmp_path_factory.mktemp(request.param)
    path = tmp / "tiny.gguf"
    _write_tiny_gguf(path, request.param, np.random.default_rng(5))
    out = convert_gguf(path, tmp / "converted", progress=False)
    return out, transformers_gguf(path)


def _native_model(out, dtype=torch.float32):
    cfg = ModelConfig.from_dir(out)
    model = load_model(out, cfg, dtype=dtype)
    ModelRunner(model, cfg, EngineConfig(dtype=dtype, block_size=4, num_kv_blocks=17))
    return model


def test_tiny_gguf_loads_quantized(tiny, compiled):
    out, _ = tiny
    model = _native_model(out)
    layers = model.model.layers
    formats = {
        name: ggml.format_of(p, model.get_submodule(name.rpartition(".")[0]).weight_scale_inv)
        for name, p in model.named_parameters()
        if p.dtype in (torch.uint8, torch.int8)
    }
    # Layer 0's q/k/v (Q4_K beside Q6_K) had no shared format: dequantized to the model's dtype.
    assert layers[0].self_attn.qkv_proj.weight.dtype == torch.float32
    assert formats["model.layers.1.self_attn.qkv_proj.weight"] == ("q8", 32)  # Q5_0 + Q8_0
    assert formats["model.layers.0.mlp.gate_up_proj.weight"] == ("q4", 32)  # Q4_1
    assert formats["model.layers.0.mlp.down_proj.weight"] == ("q8", 16)  # Q6_K
    assert formats["model.layers.1.mlp.down_proj.weight"] == ("q4", 32)  # Q4_K
    assert formats["model.layers.0.self_attn.o_proj.weight"] == ("q5", 32)  # Q5_1
    assert formats["model.embed_tokens.weight"] == ("q8", 32)
    assert formats["lm_head.weight"] == ("q5", 32)
    # Back to dense: every quantized weight, the tied or separate head included.
    assert dequantize_model(model, torch.float32) == len(formats)
    assert all(p.is_floating_point() for p in model.parameters())


def test_tiny_gguf_logits_match_transformers(tiny, compiled):
    """Prefill (20 rows: the panel GEMM; on AVX2 the int16 GEMM) then decode one token at a
    time (the GEMV)."""
    out, reference = tiny
    model = _native_model(out)
    seq = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = reference(seq[None]).logits[0]
    table = list(range(1, 17))
    prefill = 20
    meta = build_metadata([prefill], [prefill], [table], 4)
    with torch.inference_mode(), forward_context(meta):
        logits = model.compute_logits(model(seq[:prefill], torch.arange(prefill)))
    # The AVX2 GEMV and int16 GEMM round x to int16 per group of 32 (a step of 2^-16 of the
    # group's largest; held exactly to that by test_kernels_equal_the_reference): 9e-4 at most.
    atol = 2e-3 if kernels.quantizes_x() else 1e-4
    torch.testing.assert_close(logits, want[:prefill], atol=atol, rtol=0)
    for pos in range(prefill, len(seq)):
        meta = build_metadata([1], [pos + 1], [table], 4)
        with torch.inference_mode(), forward_context(meta):
            logits = model.compute_logits(model(seq[pos : pos + 1], torch.tensor([pos])))
        torch.testing.assert_close(logits[0], want[pos], atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_compiled_layer_loop_equals_the_python_one(tiny, compiled, monkeypatch, dtype):
    """Decode steps of two sequences of different lengths: the model body in C++
    (csrc/decode_layers.h: embedding, layers, final norm; layer 0's dense qkv through torch's
    linear, or the packed kernel where the CPU has AVX-512 BF16) gives the Python loop's logits
    bit for bit."""
    if dtype == torch.bfloat16 and not bf16_kernels.available():
        pytest.skip("a dense bf16 weight takes the compiled loop only packed (AVX-512 BF16)")
    out, _ = tiny
    model = _native_model(out, dtype)
    seq = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    tables, starts = [list(range(1, 9)), list(range(9, 17))], [9, 5]
    ids = torch.cat([seq[0, :9], seq[1, :5]])
    meta = build_metadata(starts, starts, tables, 4)
    with torch.inference_mode(), forward_context(meta):
        model(ids, torch.cat([torch.arange(9), torch.arange(5)]))
    for step in range(6):
        pos = [s + step for s in starts]
        meta = build_metadata([1, 1], [p + 1 for p in pos], tables, 4)
        logits = {}
        for native in (True, False):
            monkeypatch.setattr(llama, "NATIVE_DECODE", native)
            with torch.inference_mode(), forward_context(meta):
                hidden = model(seq[[0, 1], pos], torch.tensor(pos))
                logits[native] = model.compute_logits(hidden)
        assert model.compiled_layers().native is not None
        assert torch.equal(logits[True], logits[False])
    if dtype == torch.bfloat16 and kernels.takes_panels():  # q4 / q5 went in panels at load
        down = model.model.layers[1].mlp.down_proj  # Q4_K, 256 rows
        assert ggml.format_of(down.weight, down.weight_scale_inv) == ("q4p", 32)


def test_the_cache_keeps_no_weights(tiny):
    out, _ = tiny
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in names and hub.CONVERTED_MARKER in names


def test_old_float32_conversions_are_replaced(tmp_path, monkeypatch):
    """A format-1 conversion (a float32 model.safetensors) of the same file is deleted when the
    file is converted in the current format; another file's conversion is kept."""
    monkeypatch.setenv("THRIFTY_HOME", str(tmp_path / "home"))
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, "llama", np.random.default_rng(6))
    converted = tmp_path / "home" / "converted"
    old, other = converted / "tiny-000000000000", converted / "tiny-111111111111"
    for d, source in ((old, path), (other, tmp_path / "elsewhere" / "tiny.gguf")):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"\0" * 1000)
        (d / hub.CONVERTED_MARKER).write_text(json.dumps({"source": str(source.resolve())}))
    out = hub.convert(path, progress=False)
    assert not old.exists() and other.exists()
    assert json.loads((out / hub.CONVERTED_MARKER).read_text())["format"] == hub.CONVERTED_FORMAT
    assert hub.convert(path, progress=False) == out  # cached: converted once
