"""FP8 checkpoints end to end: a hand-made one in DeepSeek-V3's exact layout against its bf16
source, quantize-on-load, `thrifty quantize` on the real SmolLM2, and bad input refused."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from thrifty import LLM
from thrifty.cli import main
from thrifty.config import EngineConfig, ModelConfig
from thrifty.engine.model_runner import ModelRunner
from thrifty.engine.sampling_params import SamplingParams
from thrifty.errors import ThriftyError
from thrifty.loader.weights import load_model
from thrifty.models.attention import build_metadata, forward_context
from thrifty.models.layers import Linear
from thrifty.quant import fp8
from thrifty.quant.checkpoint import quantize_checkpoint

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEEPSEEK_V3_QUANT = {  # DeepSeek-V3's config.json, verbatim
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory) -> Path:
    """A tiny Qwen2 whose projections are not multiples of 128: edge blocks, shards of 32 and
    64 rows that merge on a finer scale grid."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        hidden_size=160,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=5,
        num_key_value_heads=1,
        vocab_size=500,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    path = tmp_path_factory.mktemp("bf16")
    model.save_pretrained(path)
    return path


def _block_quantize(w: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's recipe written out block by block, independent of thrifty.quant.fp8."""
    n, k = w.shape
    scales = torch.empty(math.ceil(n / 128), math.ceil(k / 128))
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
            s = block.abs().max().item() / 448
            if ue8m0:
                s = 2.0 ** math.ceil(math.log2(s))
            scales[i, j] = s
            q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (block / s).to(q.dtype)
    return q, scales


def _deepseek_layout(src: Path, dst: Path, ue8m0: bool, edit=None) -> Path:
    """Copy `src` as DeepSeek ships FP8: projections in E4M3 + `.weight_scale_inv`, the rest
    (embeddings, norms, biases, lm_head) in bf16, quantization_config in config.json."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in load_file(src / "model.safetensors").items():
        if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
            tensors[name], tensors[name + "_scale_inv"] = _block_quantize(t, ue8m0)
        else:
            tensors[name] = t
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = dict(
        DEEPSEEK_V3_QUANT, **({"scale_fmt": "ue8m0"} if ue8m0 else {})
    )
    if edit:
        edit(tensors, config)
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _logits(
    path: Path, quantization: str | None = None, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Logits of a 12-token prefill (the panel kernel) then 3 decode steps (the GEMV in bf16)."""
    cfg = ModelConfig.from_dir(path)
    model = load_model(path, cfg, dtype=dtype, quantization=quantization)
    ModelRunner(model, cfg, EngineConfig(dtype=dtype, block_size=4, num_kv_blocks=8))
    ids = torch.arange(3, 18) * 7 % cfg.vocab_size
    out = []
    with torch.inference_mode():
        for start, end in ((0, 12), (12, 13), (13, 14), (14, 15)):
            meta = build_metadata([end - start], [end], [list(range(1, 5))], 4)
            with forward_context(meta):
                hidden = model(ids[start:end], torch.arange(start, end))
            out.append(model.compute_logits(hidden[-1:]))
    return torch.cat(out)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _dequantized_twin(fp8_dir: Path, dst: Path) -> Path:
    """The FP8 checkpoint's weights dequantized in float32: what its kernels must compute."""
    dst.mkdir()
    tensors = load_file(fp8_dir / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        if scale is not None:
            full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
            t = t.float() * full[: t.shape[0], : t.shape[1]]
        out[name] = t.float()
    save_file(out, dst / "model.safetensors")
    config = json.loads((fp8_dir / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("ue8m0", [False, True], ids=["float-scales", "ue8m0"])
def test_deepseek_layout_loads_and_matches_bf16_source(bf16_source, tmp_path, ue8m0):
    path = _deepseek_layout(bf16_source, tmp_path / "fp8", ue8m0)
    cfg = ModelConfig.from_dir(path)
    assert cfg.quantization == fp8.Fp8Config("ue8m0" if ue8m0 else "float")
    model = load_model(path, cfg, dtype=torch.bfloat16)
    qkv = model.model.layers[0].self_attn.qkv_proj
    # q (160 rows), k and v (32 each) keep their bytes, on a 32-row scale grid.
    assert qkv.weight.dtype == torch.float8_e4m3fn and tuple(qkv.weight_scale_inv.shape) == (7, 2)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    # In float32 the model computes its dequantized twin to float rounding ...
    twin = _dequantized_twin(path, tmp_path / "twin")
    f32 = torch.float32
    torch.testing.assert_close(
        _logits(path, dtype=f32), _logits(twin, dtype=f32), rtol=0, atol=1e-4
    )
    # ... which is the bf16 source up to E4M3's rounding of every projection weight.
    got, want = _logits(path), _logits(bf16_source)
    assert _rel_err(got, want) < 0.1
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75


def test_quantize_on_load_keeps_head_embeddings_and_norms(bf16_source):
    cfg = ModelConfig.from_dir(bf16_source)
    model = load_model(bf16_source, cfg, dtype=torch.bfloat16, quantization="fp8")
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name != "lm_head":
            assert module.weight.dtype == torch.float8_e4m3fn, name
            mantissa, _ = torch.frexp(module.weight_scale_inv)
            assert (mantissa == 0.5).all(), f"{name}: UE8M0 scales are powers of two"
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight_scale_inv is None
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert _rel_err(_logits(bf16_source, "fp8"), _logits(bf16_source)) < 0.1


def test_fp8_all_quantizes_an_untied_head_too(bf16_source):
    cfg = ModelConfig.from_dir(bf16_source)
    assert not cfg.tie_word_embeddings
    model = load_model(bf16_source, cfg, dtype=torch.bfloat16, quantization="fp8-all")
    head = model.lm_head
    assert head.weight.dtype == torch.float8_e4m3fn
    assert head.weight_scale_inv.shape == fp8.scale_shape(head.weight.shape)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # looked up, not multiplied
    want = _logits(bf16_source)
    assert _rel_err(_logits(bf16_source, "fp8-all"), want) < 0.1
    assert (_logits(bf16_source, "fp8-all").argmax(-1) == want.argmax(-1)).float().mean() >= 0.75


BAD = {
    "missing scale": (
        lambda t, c: t.pop("model.layers.1.mlp.down_proj.weight_scale_inv"),
        r"'model.layers.1.mlp.down_proj.weight' has no scale tensor",
    ),
    "mis-shaped scale": (
        lambda t, c: t.update(
            {"model.layers.0.self_attn.k_proj.weight_scale_inv": torch.ones(2, 2)}
        ),
        r"'model.layers.0.self_attn.k_proj.weight_scale_inv' has shape \(2, 2\), expected \(1, 2\)",
    ),
    "NaN scale": (
        lambda t, c: t["model.layers.0.mlp.up_proj.weight_scale_inv"].__setitem__((1, 1), math.nan),
        r"'model.layers.0.mlp.up_proj.weight_scale_inv' holds nan at block \(1, 1\)",
    ),
    "NaN weight": (
        lambda t, c: (
            t["model.layers.1.self_attn.o_proj.weight"].view(torch.uint8).__setitem__((2, 3), 0xFF)
        ),
        r"'model.layers.1.self_attn.o_proj.weight' holds NaN at \(2, 3\) \(1 of ",
    ),
    "unsupported fmt": (
        lambda t, c: c["quantization_config"].update(fmt="e5m2"),
        r"quantization_config.fmt 'e5m2'",
    ),
    "scale on a bf16 weight": (
        lambda t, c: t.update({"lm_head.weight_scale_inv": torch.ones(4, 2)}),
        r"'lm_head.weight_scale_inv' belongs to a weight that is not float8_e4m3fn",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_fp8_checkpoints_are_refused_by_name(bf16_source, tmp_path, case):
    edit, message = BAD[case]
    path = _deepseek_layout(bf16_source, tmp_path / "bad", ue8m0=True, edit=edit)
    with pytest.raises(ThriftyError, match=message):
        load_model(path, ModelConfig.from_dir(path), dtype=torch.bfloat16)


@pytest.mark.slow
def test_thrifty_quantize_writes_a_checkpoint_that_loads_and_generates(
    smollm2_gguf, tmp_path, capsys
):
    dst = tmp_path / "smollm2-fp8"
    assert main(["quantize", "smollm2-135m-instruct", str(dst), "--scale-fmt", "float"]) == 0
    assert "quantize (float)" in capsys.readouterr().err  # the progress bar
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"] == DEEPSEEK_V3_QUANT
    assert (dst / "tokenizer.json").exists()
    tensors = load_file(dst / "model.safetensors")
    assert tensors["model.layers.0.self_attn.k_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.self_attn.k_proj.weight_scale_inv"].shape == (2, 5)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    params = SamplingParams(max_tokens=8, temperature=0)
    out = LLM(str(dst), progress=False).generate("The capital of France is", params)
    assert "Paris" in out[0].outputs[0].text
    with pytest.raises(ThriftyError, match="already quantized"):
        quantize_checkpoint(dst, tmp_path / "again")


def test_quantized_files_are_readable_by_others(bf16_source, tmp_path):
    """`thrifty quantize` output is a model to share, not a secret, even from 0600 sources."""
    src = tmp_path / "private"
    shutil.copytree(bf16_source, src)
    for f in src.iterdir():
        f.chmod(0o600)
    dst = quantize_checkpoint(src, tmp_path / "fp8", progress=False)
    modes = {f.name: f.stat().st_mode & 0o777 for f in dst.iterdir()}
    assert "model.safetensors" in modes and "config.json" in modes
    assert all(mode == 0o644 for mode in modes.values()), modes
