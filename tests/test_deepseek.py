"""DeepSeek-V3 / V2 as tiny random models: logits equal transformers' (fp32, 1e-4).

Covers q with and without a low-rank projection, dense-then-MoE layers, grouped routing (V3's
biased sigmoid and V2's softmax), shared experts and YaRN with DeepSeek's mscale, for a batched
prefill of different lengths and for a chunked prefill followed by batched decoding (decode takes
the weight-absorbed path). Also: the compressed cache's size, MoE grouping against the per-token
loop, and bad checkpoints.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from thrifty.config import EngineConfig, ModelConfig
from thrifty.engine.model_runner import ModelRunner, kv_bytes_per_token
from thrifty.errors import ThriftyError
from thrifty.loader.weights import load_model
from thrifty.models.attention import build_metadata, forward_context
from thrifty.models.moe import grouped_experts, naive_experts

BLOCK = 4
BLOCKS_PER_SEQ = 8
LENGTHS = [5, 11, 17]

COMMON = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=24,
    n_routed_experts=8,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 128,
    "rope_theta": 10000.0,
    "mscale": 0.8,
    "mscale_all_dim": 0.8,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}

CASES = {
    "v3-qlora-grouped": (
        transformers.DeepseekV3Config,
        dict(
            q_lora_rank=48, n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5
        ),
    ),
    "v3-yarn-noqlora": (
        transformers.DeepseekV3Config,
        dict(
            q_lora_rank=None,
            n_group=2,
            topk_group=1,
            n_shared_experts=2,
            rope_parameters=YARN,
            rope_interleave=False,
            norm_topk_prob=False,
        ),
    ),
    "v2-greedy": (
        transformers.DeepseekV2Config,
        dict(q_lora_rank=None, topk_method="greedy", n_shared_experts=2, routed_scaling_factor=1.5),
    ),
    "v2-grouped-yarn": (
        transformers.DeepseekV2Config,
        dict(
            q_lora_rank=48,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        ),
    ),
}
FORMS = {"absorbed": 1 << 20, "expanded": 1}
MODEL_CLASSES = {
    transformers.DeepseekV3Config: transformers.DeepseekV3ForCausalLM,
    transformers.DeepseekV2Config: transformers.DeepseekV2ForCausalLM,
}


def make_checkpoint(path, config_cls, extra, seed=0):
    torch.manual_seed(seed)
    hf = MODEL_CLASSES[config_cls](config_cls(**{**COMMON, **extra})).eval()
    # Random init leaves norms at 1, the routing bias at 0 and the router near uniform: perturb
    # them so that they are tested and the choice of experts is decisive.
    with torch.no_grad():
        for name, p in list(hf.named_parameters()) + list(hf.named_buffers()):
            if "norm" in name or "e_score_correction_bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    hf.save_pretrained(path)
    return hf


@pytest.fixture(
    scope="module",
    params=[(c, f) for c in sorted(CASES) for f in FORMS],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def pair(request, tmp_path_factory):
    """(transformers' model, ours); ours attends to several new tokens per sequence either
    straight over the latents (absorbed) or over per-head keys and values (expanded)."""
    case, form = request.param
    config_cls, extra = CASES[case]
    path = tmp_path_factory.mktemp(case)
    hf = make_checkpoint(path, config_cls, extra)
    cfg = ModelConfig.from_dir(path)
    model = load_model(path, cfg, dtype=torch.float32)
    for layer in model.model.layers:  # decode (one query) always takes the absorbed form
        layer.self_attn.max_absorbed_queries = FORMS[form]
    engine_config = EngineConfig(
        dtype=torch.float32, block_size=BLOCK, num_kv_blocks=BLOCKS_PER_SEQ * len(LENGTHS) + 1
    )
    ModelRunner(model, cfg, engine_config)  # allocates and attaches the compressed cache
    return hf, model


def _tables() -> list[list[int]]:
    return [
        list(range(1 + i * BLOCKS_PER_SEQ, 1 + (i + 1) * BLOCKS_PER_SEQ))
        for i in range(len(LENGTHS))
    ]


def _forward(model, seqs, starts, ends) -> list[torch.Tensor]:
    ids = torch.cat([s[a:b] for s, a, b in zip(seqs, starts, ends, strict=True)])
    pos = torch.cat([torch.arange(a, b) for a, b in zip(starts, ends, strict=True)])
    qlens = [b - a for a, b in zip(starts, ends, strict=True)]
    meta = build_metadata(qlens, list(ends), _tables(), BLOCK)
    with torch.inference_mode(), forward_context(meta):
        logits = model.compute_logits(model(ids, pos))
    return list(logits.split(qlens))


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, COMMON["vocab_size"], (n,), generator=g) for n in LENGTHS]


def _reference(hf, prompts) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [hf(p[None]).logits[0].float() for p in prompts]


def test_batched_prefill_matches_transformers(pair, prompts):
    hf, model = pair
    ours = _forward(model, prompts, [0] * len(prompts), [len(p) for p in prompts])
    for got, want in zip(ours, _reference(hf, prompts), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_chunked_prefill_then_absorbed_decode_matches_transformers(pair, prompts):
    hf, model = pair
    want = _reference(hf, prompts)
    first, second = [2, 4, 6], [3, 8, 9]
    for a, b in ((None, first), (first, second)):
        starts = [0] * len(prompts) if a is None else a
        got = _forward(model, prompts, starts, b)
        for g, w, s, e in zip(got, want, starts, b, strict=True):
            torch.testing.assert_close(g, w[s:e], atol=1e-4, rtol=0)
    pos = list(second)
    while any(p < len(s) for p, s in zip(pos, prompts, strict=True)):
        live = [i for i, s in enumerate(prompts) if pos[i] < len(s)]
        ids = torch.stack([prompts[i][pos[i]] for i in live])
        positions = torch.tensor([pos[i] for i in live])
        tables = [_tables()[i] for i in live]
        meta = build_metadata([1] * len(live), [pos[i] + 1 for i in live], tables, BLOCK)
        with torch.inference_mode(), forward_context(meta):
            logits = model.compute_logits(model(ids, positions))
        for row, i in enumerate(live):
            torch.testing.assert_close(logits[row], want[i][pos[i]], atol=1e-4, rtol=0)
            pos[i] += 1


def test_kv_cache_holds_only_latent_and_rope_key(pair):
    _, model = pair
    cfg = model.config
    m = cfg.mla
    per_token = (m.kv_lora_rank + m.qk_rope_head_dim) * cfg.num_layers  # no MTP layer here
    for dtype in (torch.float32, torch.bfloat16):
        assert kv_bytes_per_token(cfg, dtype, model) == per_token * dtype.itemsize
    config = EngineConfig(dtype=torch.bfloat16, block_size=16, kv_cache_memory_bytes=1 << 20)
    runner = ModelRunner(model, cfg, config)
    assert runner.num_blocks == (1 << 20) // (per_token * 2 * 16)
    assert runner.kv_cache.shape == (cfg.num_layers, runner.num_blocks, 16, 48)
    assert runner.kv_cache.nbytes == runner.num_blocks * 16 * per_token * 2
    # A full-head cache (K and V for every head) would need this many times more.
    full = 2 * cfg.num_layers * cfg.num_heads * m.qk_head_dim
    assert full / per_token == pytest.approx(2 * 4 * 48 / 48)
    # The latent cache takes the activations' dtype only: another is refused, by its flag.
    other = EngineConfig(dtype=torch.float32, kv_cache_dtype="bfloat16", num_kv_blocks=4)
    with pytest.raises(ThriftyError, match="--kv-cache-dtype bfloat16"):
        ModelRunner(model, cfg, other)


def test_grouped_experts_equal_the_per_token_loop():
    from thrifty.config import MoEConfig
    from thrifty.models.moe import MoE

    cfg = MoEConfig(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16)
    moe = MoE(32, cfg)
    torch.manual_seed(0)
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(20, 32)
    weights, ids = moe.gate(x)
    torch.testing.assert_close(
        grouped_experts(x, weights, ids, moe.experts),
        naive_experts(x, weights, ids, moe.experts),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    make_checkpoint(path, transformers.DeepseekV3Config, CASES["v3-qlora-grouped"][1])
    return path


def _copy_with(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_expert_weight_is_refused(good_checkpoint, tmp_path):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    bad = _copy_with(good_checkpoint, tmp_path / "bad", lambda t: t.pop(name))
    cfg = ModelConfig.from_dir(bad)
    with pytest.raises(ThriftyError, match=rf"missing tensor\(s\): {name}"):
        load_model(bad, cfg, dtype=torch.float32)


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.1.mlp.experts.3.gate_proj.weight",
        "model.layers.0.self_attn.kv_b_proj.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
    ],
)
def test_wrongly_shaped_tensor_is_refused(good_checkpoint, tmp_path, name):
    def edit(t):
        t[name] = torch.zeros(*[d + 1 for d in t[name].shape])

    bad = _copy_with(good_checkpoint, tmp_path / "bad", edit)
    cfg = ModelConfig.from_dir(bad)
    with pytest.raises(ThriftyError, match=rf"tensor '{name}' has shape"):
        load_model(bad, cfg, dtype=torch.float32)


def test_bad_routing_config_is_refused(good_checkpoint):
    cfg = json.loads((good_checkpoint / "config.json").read_text())
    with pytest.raises(ThriftyError, match="topk_method"):
        ModelConfig.from_hf({**cfg, "topk_method": "magic"})
    with pytest.raises(ThriftyError, match="n_group"):
        ModelConfig.from_hf({**cfg, "n_group": 3})


def write_tokenizer(path, vocab_size: int = COMMON["vocab_size"]) -> None:
    """A word-level tokenizer ("t0" .. "tN") so that the engine can run a tiny random model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


def test_engine_generates_like_transformers(tmp_path):
    """Through the whole engine: chunked prefill, prefix caching and preemption (a cache too
    small for every sequence at once) give transformers' greedy tokens."""
    from thrifty.engine.llm_engine import LLMEngine
    from thrifty.engine.sampling_params import SamplingParams

    hf = make_checkpoint(tmp_path, transformers.DeepseekV3Config, CASES["v3-qlora-grouped"][1])
    write_tokenizer(tmp_path)
    g = torch.Generator().manual_seed(2)
    shared = torch.randint(2, 300, (9,), generator=g).tolist()
    prompts = [shared + torch.randint(2, 300, (n,), generator=g).tolist() for n in (3, 7, 12, 5)]
    config = EngineConfig(
        dtype=torch.float32,
        block_size=4,
        num_kv_blocks=16,
        max_num_batched_tokens=8,
        max_num_seqs=4,
    )
    engine = LLMEngine(tmp_path, config)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=str(i))
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    assert engine.scheduler.num_preemptions > 0
    assert engine.blocks.prefix_hits > 0
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            want = hf.generate(
                torch.tensor([p]), max_new_tokens=10, do_sample=False, min_new_tokens=10
            )[0, len(p) :].tolist()
            assert out[str(i)] == want, i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_path_equals_torch_path(good_checkpoint, dtype):
    """The compiled paged decode kernel (latent entries read through the block table) against
    the pure-torch latent attention, on a batched decode step of different lengths."""
    from dataclasses import replace

    from thrifty import kernels

    if not kernels.cpu_ops_available():
        pytest.skip("the compiled cpu ops are not available here")
    cfg = ModelConfig.from_dir(good_checkpoint)
    model = load_model(good_checkpoint, cfg, dtype=dtype)
    ModelRunner(model, cfg, EngineConfig(dtype=dtype, block_size=BLOCK, num_kv_blocks=25))
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, COMMON["vocab_size"], (n,), generator=g) for n in LENGTHS]
    _forward(model, seqs, [0] * 3, [n - 1 for n in LENGTHS])  # prefill all but the last token
    ids = torch.stack([s[-1] for s in seqs])
    pos = torch.tensor([n - 1 for n in LENGTHS])
    meta = build_metadata([1] * 3, LENGTHS, _tables(), BLOCK)
    assert meta.block_tables is not None  # the kernel path
    outs = []
    for m in (meta, replace(meta, block_tables=None, context_lens=None)):
        with torch.inference_mode(), forward_context(m):
            outs.append(model.compute_logits(model(ids, pos)))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[0], outs[1], atol=tol, rtol=tol)
