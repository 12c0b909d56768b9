"""DeepSeek-V3 in FP8: a tiny model converted to the layout DeepSeek ships, `thrifty quantize` and
quantize-on-load on it, and bad FP8 expert weights refused by name.

DeepSeek-V3's release keeps every attention and MLP projection (routed experts, shared experts
and the dense layers alike) in E4M3 with 128x128 block scales, and embeddings, norms, the router
(`mlp.gate.weight`), its float32 `e_score_correction_bias`, the MTP layer's `eh_proj` and lm_head
in higher precision. thrifty runs the FP8 Linear weights as they are and dequantizes MLA's
kv_b_proj at load, since the absorbed attention reads it as per-head matrices.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_deepseek import make_checkpoint, write_tokenizer
from test_fp8_loading import DEEPSEEK_V3_QUANT, _block_quantize, _dequantized_twin, _rel_err

from thrifty.cli import main
from thrifty.config import EngineConfig, ModelConfig
from thrifty.engine.llm_engine import LLMEngine
from thrifty.engine.model_runner import ModelRunner
from thrifty.engine.sampling_params import SamplingParams
from thrifty.errors import ThriftyError
from thrifty.loader.weights import load_model
from thrifty.models.attention import build_metadata, forward_context
from thrifty.models.layers import Linear
from thrifty.models.mla import KVUpProjection

# Shapes off the 128 grid everywhere: hidden 160 (edge columns), q_b_proj 192 and kv_b_proj 224
# rows (edge rows), dense gate/up shards of 192 rows (merged on a 64-row scale grid), routed
# experts of 48 rows (16-row grid) and two shared experts of 96 (32-row grid).
CONFIG = dict(
    hidden_size=160,
    intermediate_size=192,
    moe_intermediate_size=48,
    q_lora_rank=96,
    kv_lora_rank=64,
    n_group=4,
    topk_group=2,
    n_shared_experts=2,
    routed_scaling_factor=2.5,
)
NUM_LAYERS = 3  # one dense layer, two MoE layers (test_deepseek.COMMON), then the MTP layer
FP8_PROJECTIONS = (
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


def _is_fp8_in_release(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in FP8_PROJECTIONS


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory) -> Path:
    """A tiny DeepSeek-V3 saved by transformers, in the release's dtypes (bf16, the routing bias
    in float32), with an MTP layer at model.layers.3 as the release has one."""
    path = tmp_path_factory.mktemp("deepseek-bf16")
    make_checkpoint(path, transformers.DeepseekV3Config, CONFIG)
    t = load_file(path / "model.safetensors")
    n = NUM_LAYERS
    g = torch.Generator().manual_seed(1)
    for name in [k for k in t if k.startswith(f"model.layers.{n - 1}.")]:
        t[name.replace(f".{n - 1}.", f".{n}.", 1)] = t[name].clone()
    h = CONFIG["hidden_size"]
    t |= {
        f"model.layers.{n}.enorm.weight": 1 + 0.1 * torch.randn(h, generator=g),
        f"model.layers.{n}.hnorm.weight": 1 + 0.1 * torch.randn(h, generator=g),
        f"model.layers.{n}.eh_proj.weight": torch.randn(h, 2 * h, generator=g) * 0.05,
        f"model.layers.{n}.shared_head.norm.weight": t["model.norm.weight"].clone(),
        f"model.layers.{n}.shared_head.head.weight": t["lm_head.weight"].clone(),
        f"model.layers.{n}.embed_tokens.weight": t["model.embed_tokens.weight"].clone(),
    }
    t = {
        k: v.float() if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)
        for k, v in t.items()
    }
    save_file(t, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config |= {"num_nextn_predict_layers": 1, "torch_dtype": "bfloat16"}
    config.pop("dtype", None)
    (path / "config.json").write_text(json.dumps(config))
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def release_tensors(bf16_source) -> dict[bool, dict[str, torch.Tensor]]:
    """The source's tensors as DeepSeek ships them, with float scales and with UE8M0 scales."""
    src = load_file(bf16_source / "model.safetensors")
    out = {}
    for ue8m0 in (False, True):
        tensors = {}
        for name, t in src.items():
            if _is_fp8_in_release(name):
                tensors[name], tensors[name + "_scale_inv"] = _block_quantize(t, ue8m0)
            else:
                tensors[name] = t
        out[ue8m0] = tensors
    return out


def _write_release(src: Path, tensors: dict, dst: Path, ue8m0: bool, edit=None) -> Path:
    dst.mkdir(parents=True)
    tensors = dict(tensors)
    if edit:
        edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = dict(
        DEEPSEEK_V3_QUANT, **({"scale_fmt": "ue8m0"} if ue8m0 else {})
    )
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _logits(path: Path, dtype: torch.dtype, quantization: str | None = None):
    """(main logits, MTP logits) of a 12-token prefill in the expanded form, then 3 decode steps
    in the absorbed form; the MTP layer drafts from each step's hidden states."""
    cfg = ModelConfig.from_dir(path)
    model = load_model(path, cfg, dtype=dtype, quantization=quantization)
    assert model.num_mtp_layers == 1
    for layer in model.model.layers:
        layer.self_attn.max_absorbed_queries = 1  # several queries: expand kv_b_proj
    ModelRunner(model, cfg, EngineConfig(dtype=dtype, block_size=4, num_kv_blocks=8))
    ids = torch.arange(3, 19) * 7 % cfg.vocab_size
    main_logits, mtp_logits = [], []
    with torch.inference_mode():
        for start, end in ((0, 12), (12, 13), (13, 14), (14, 15)):
            pos = torch.arange(start, end)
            meta = build_metadata([end - start], [end], [list(range(1, 5))], 4)
            with forward_context(meta):
                hidden = model(ids[start:end], pos)
                draft = model.mtp_forward(ids[start + 1 : end + 1], pos, hidden)
            main_logits.append(model.compute_logits(hidden))
            mtp_logits.append(model.compute_logits(draft))
    return torch.cat(main_logits), torch.cat(mtp_logits)


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


@pytest.mark.parametrize("ue8m0", [False, True], ids=["float-scales", "ue8m0"])
def test_release_layout_loads_and_matches_its_source(bf16_source, release_tensors, tmp_path, ue8m0):
    path = _write_release(bf16_source, release_tensors[ue8m0], tmp_path / "fp8", ue8m0)
    model = load_model(path, ModelConfig.from_dir(path), dtype=torch.bfloat16)
    layers = model.model.layers
    moe = layers[1].mlp
    for linear in (
        layers[0].self_attn.q_a_proj,
        layers[0].self_attn.q_b_proj,
        layers[0].self_attn.kv_a_proj_with_mqa,
        layers[0].self_attn.o_proj,
        layers[0].mlp.gate_up_proj,
        moe.experts[5].gate_up_proj,
        moe.experts[5].down_proj,
        moe.shared_experts.gate_up_proj,
        layers[3].mlp.experts[0].down_proj,  # the MTP layer's
    ):
        assert linear.weight.dtype == torch.float8_e4m3fn and linear.weight_scale_inv is not None
    # gate and up keep their bytes and scales, on the finest grid their shards need.
    assert tuple(moe.experts[5].gate_up_proj.weight_scale_inv.shape) == (6, 2)  # 16-row blocks
    assert tuple(layers[0].mlp.gate_up_proj.weight_scale_inv.shape) == (6, 2)  # 64-row blocks
    # kv_b_proj is read as per-head matrices by the absorbed attention: dequantized at load.
    kv_b = layers[0].self_attn.kv_b_proj
    assert isinstance(kv_b, KVUpProjection) and kv_b.weight.dtype == torch.bfloat16
    assert moe.gate.weight.dtype == torch.bfloat16
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert layers[3].eh_proj.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16

    # In float32 the model computes the checkpoint's dequantized twin to float rounding ...
    twin = _dequantized_twin(path, tmp_path / "twin")
    for got, want in zip(_logits(path, torch.float32), _logits(twin, torch.float32), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # ... and in bf16 it is its bf16 source up to E4M3's rounding of the projections: about 10%
    # of these small random logits (UE8M0 a little more), where bf16 alone moves them 6%.
    (got, got_mtp), (want, want_mtp) = (
        _logits(path, torch.bfloat16),
        _logits(bf16_source, torch.bfloat16),
    )
    assert _rel_err(got, want) < 0.15 and _rel_err(got_mtp, want_mtp) < 0.15
    assert _agree(got, want) >= 0.75 and _agree(got_mtp, want_mtp) >= 0.75


def test_thrifty_quantize_and_quantize_on_load(bf16_source, tmp_path, capsys):
    dst = tmp_path / "quantized"
    assert main(["quantize", str(bf16_source), str(dst)]) == 0
    capsys.readouterr()
    tensors = load_file(dst / "model.safetensors")
    fp8 = {k for k, v in tensors.items() if v.dtype == torch.float8_e4m3fn}
    # The release's FP8 set, less kv_b_proj (dense at load either way), plus the MTP eh_proj.
    want = {
        k
        for k in load_file(bf16_source / "model.safetensors")
        if (_is_fp8_in_release(k) and "kv_b_proj" not in k) or k.endswith("eh_proj.weight")
    }
    assert fp8 == want
    assert all(k + "_scale_inv" in tensors for k in fp8)
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert json.loads((dst / "config.json").read_text())["quantization_config"] == dict(
        DEEPSEEK_V3_QUANT, scale_fmt="ue8m0"
    )
    assert (dst / "tokenizer.json").exists()

    # Written then loaded, or quantized on load: both near the source, both generate.
    (want, _), (written, _), (on_load, _) = (
        _logits(bf16_source, torch.bfloat16),
        _logits(dst, torch.bfloat16),
        _logits(bf16_source, torch.bfloat16, quantization="fp8"),
    )
    assert _rel_err(written, want) < 0.15 and _rel_err(on_load, want) < 0.15
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    def generate(path: Path, **engine_kwargs) -> list[int]:
        engine = LLMEngine(path, EngineConfig(block_size=4, num_kv_blocks=16, **engine_kwargs))
        expert = engine.runner.model.model.layers[2].mlp.experts[7].down_proj
        assert isinstance(expert, Linear) and expert.weight.dtype == torch.float8_e4m3fn
        engine.add_request("t5 t17 t42 t8", params, request_id="0")
        tokens = []
        while engine.has_unfinished():
            tokens += [t for o in engine.step() for t in o.token_ids]
        return tokens

    plain = generate(dst, dtype=torch.float32)
    assert len(plain) == 6
    # The FP8 MTP layer drafts; greedy verification keeps the tokens.
    assert generate(dst, dtype=torch.float32, num_speculative_tokens=1) == plain
    assert len(generate(bf16_source, quantization="fp8")) == 6


def _drop(name: str):
    return lambda t: t.pop(name)


BAD = {
    "scale of a routed expert's down_proj": (
        _drop("model.layers.2.mlp.experts.5.down_proj.weight_scale_inv"),
        r"'model.layers.2.mlp.experts.5.down_proj.weight' has no scale tensor "
        r"'model.layers.2.mlp.experts.5.down_proj.weight_scale_inv'",
    ),
    "scale of a routed expert's up_proj (a merged shard)": (
        _drop("model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"),
        r"'model.layers.1.mlp.experts.3.up_proj.weight' has no scale tensor",
    ),
    "scale of a shared expert's gate_proj": (
        _drop("model.layers.2.mlp.shared_experts.gate_proj.weight_scale_inv"),
        r"'model.layers.2.mlp.shared_experts.gate_proj.weight' has no scale tensor",
    ),
    "scale of an MTP expert's gate_proj": (
        _drop("model.layers.3.mlp.experts.0.gate_proj.weight_scale_inv"),
        r"'model.layers.3.mlp.experts.0.gate_proj.weight' has no scale tensor",
    ),
    "scale of kv_b_proj (dequantized at load)": (
        _drop("model.layers.0.self_attn.kv_b_proj.weight_scale_inv"),
        r"'model.layers.0.self_attn.kv_b_proj.weight' has no scale tensor",
    ),
    "an expert's FP8 up_proj": (
        _drop("model.layers.2.mlp.experts.6.up_proj.weight"),
        r"missing tensor\(s\): model.layers.2.mlp.experts.6.up_proj.weight$",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_fp8_expert_weights_are_refused_by_name(bf16_source, release_tensors, tmp_path, case):
    edit, message = BAD[case]
    path = _write_release(bf16_source, release_tensors[True], tmp_path / "bad", True, edit)
    with pytest.raises(ThriftyError, match=message):
        load_model(path, ModelConfig.from_dir(path), dtype=torch.bfloat16)


# DeepSeek-V3's config.json, but for num_hidden_layers (61 there; here 3 dense and 1 MoE layer,
# then the MTP layer at model.layers.4) and fields thrifty does not read.
RELEASE_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "attention_bias": False,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 4,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": DEEPSEEK_V3_QUANT,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "v_head_dim": 128,
    "vocab_size": 129280,
}
# Tensors of the release (name, shape, scale grid or None for a bf16/float32 tensor).
RELEASE_TENSORS = [
    ("model.embed_tokens.weight", (129280, 7168), None),
    ("model.layers.0.self_attn.q_a_proj.weight", (1536, 7168), (12, 56)),
    ("model.layers.0.self_attn.q_a_layernorm.weight", (1536,), None),
    ("model.layers.0.self_attn.q_b_proj.weight", (24576, 1536), (192, 12)),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", (576, 7168), (5, 56)),  # edge rows
    ("model.layers.0.self_attn.kv_a_layernorm.weight", (512,), None),
    ("model.layers.0.self_attn.kv_b_proj.weight", (32768, 512), (256, 4)),
    ("model.layers.0.self_attn.o_proj.weight", (7168, 16384), (56, 128)),
    ("model.layers.0.mlp.gate_proj.weight", (18432, 7168), (144, 56)),
    ("model.layers.0.mlp.up_proj.weight", (18432, 7168), (144, 56)),
    ("model.layers.0.mlp.down_proj.weight", (7168, 18432), (56, 144)),
    ("model.layers.3.mlp.gate.weight", (256, 7168), None),
    ("model.layers.3.mlp.gate.e_score_correction_bias", (256,), None),
    ("model.layers.3.mlp.experts.255.gate_proj.weight", (2048, 7168), (16, 56)),
    ("model.layers.3.mlp.experts.255.up_proj.weight", (2048, 7168), (16, 56)),
    ("model.layers.3.mlp.experts.255.down_proj.weight", (7168, 2048), (56, 16)),
    ("model.layers.3.mlp.shared_experts.gate_proj.weight", (2048, 7168), (16, 56)),
    ("model.layers.3.mlp.shared_experts.down_proj.weight", (7168, 2048), (56, 16)),
    ("model.layers.4.eh_proj.weight", (7168, 14336), None),
    ("model.layers.4.enorm.weight", (7168,), None),
    ("model.layers.4.shared_head.norm.weight", (7168,), None),
    ("model.layers.4.mlp.experts.0.gate_proj.weight", (2048, 7168), (16, 56)),
    ("model.layers.4.self_attn.kv_b_proj.weight", (32768, 512), (256, 4)),
    ("model.norm.weight", (7168,), None),
    ("lm_head.weight", (129280, 7168), None),
]


def test_release_config_and_tensor_shapes_fit_the_model():
    """The release's config builds the model (without memory) whose parameters take the
    release's tensors: shapes, scale grids, and which FP8 weights run as FP8 Linears."""
    from thrifty.loader.fp8 import Fp8Weights
    from thrifty.loader.weights import _split_packed
    from thrifty.models import model_class
    from thrifty.quant import fp8
    from thrifty.quant.checkpoint import _linear_weight_names

    cfg = ModelConfig.from_hf(RELEASE_CONFIG)
    assert cfg.quantization == fp8.Fp8Config("float") and cfg.num_mtp_layers == 1
    assert cfg.rope.type == "yarn" and cfg.rope.factor == 40
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    params = dict(model.named_parameters())
    packed = model.packed_modules()
    runs_fp8 = Fp8Weights(model, cfg.quantization, None, torch.bfloat16, "meta")._linear
    written_fp8 = _linear_weight_names(model)  # what `thrifty quantize` writes in FP8
    for name, shape, grid in RELEASE_TENSORS:
        target, shard, _ = _split_packed(name, packed)
        full = tuple(params[target].shape)
        assert (full if shard is None else (full[0] // 2, *full[1:])) == shape, name
        assert (grid is not None) == _is_fp8_in_release(name), name
        if grid is not None:
            assert fp8.scale_shape(shape) == grid, name
            assert runs_fp8(target) == ("kv_b_proj" not in name), name
        assert (name in written_fp8) == (runs_fp8(target) and name != "lm_head.weight"), name
