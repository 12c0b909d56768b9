"""Each architecture as a tiny random model: thrifty's logits equal transformers' (fp32, 1e-4).

Checked for a full batched prefill of sequences of different lengths, and for a chunked
prefill followed by step-by-step batched decoding, each against transformers run on each
sequence alone. Each also with a bfloat16 KV cache under the float32 activations
(--kv-cache-dtype bfloat16), to the rounding of keys and values that costs.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from thrifty.config import EngineConfig, ModelConfig
from thrifty.engine.model_runner import ModelRunner
from thrifty.loader.weights import load_model
from thrifty.models.attention import build_metadata, forward_context

BLOCK = 4
BLOCKS_PER_SEQ = 16
LENGTHS = [5, 11, 17]

COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)

CASES = {
    "llama": (transformers.LlamaConfig, {}),
    "llama-tied-mha": (
        transformers.LlamaConfig,
        {"tie_word_embeddings": True, "num_key_value_heads": 4, "attention_bias": True},
    ),
    "llama-linear": (
        transformers.LlamaConfig,
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
    ),
    "llama-llama3": (
        transformers.LlamaConfig,
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 500000.0,
            }
        },
    ),
    "llama-yarn": (
        transformers.LlamaConfig,
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "rope_theta": 10000.0,
            }
        },
    ),
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": False, "rope_theta": 1e6}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 32, "tie_word_embeddings": True}),
}


# The logits' distance from transformers' with keys and values rounded to bfloat16 (2^-9
# relative): at most 9.4e-4 on these models.
KV_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-3}


@pytest.fixture(
    scope="module",
    params=[(case, kv) for case in sorted(CASES) for kv in KV_TOLERANCE],
    ids=lambda p: p[0] + ("" if p[1] == torch.float32 else "-bf16-cache"),
)
def pair(request, tmp_path_factory):
    case, kv_dtype = request.param
    config_cls, extra = CASES[case]
    torch.manual_seed(0)
    hf_config = config_cls(**{**COMMON, **extra})
    model_cls = {
        transformers.LlamaConfig: transformers.LlamaForCausalLM,
        transformers.Qwen2Config: transformers.Qwen2ForCausalLM,
        transformers.Qwen3Config: transformers.Qwen3ForCausalLM,
    }[config_cls]
    hf = model_cls(hf_config).eval()
    # Random init leaves the norms at 1 and biases at 0: perturb them so that they are tested.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp(case)
    hf.save_pretrained(path)
    cfg = ModelConfig.from_dir(path)
    model = load_model(path, cfg, dtype=torch.float32)
    engine_config = EngineConfig(
        dtype=torch.float32,
        block_size=BLOCK,
        num_kv_blocks=BLOCKS_PER_SEQ * len(LENGTHS) + 1,
        kv_cache_dtype=kv_dtype,
    )
    runner = ModelRunner(model, cfg, engine_config)  # allocates and attaches the KV cache
    assert runner.kv_cache.dtype == kv_dtype
    return hf, model, KV_TOLERANCE[kv_dtype]


def _tables() -> list[list[int]]:
    # Block 0 is the null block: tables start at 1.
    return [
        list(range(1 + i * BLOCKS_PER_SEQ, 1 + (i + 1) * BLOCKS_PER_SEQ))
        for i in range(len(LENGTHS))
    ]


def _forward(model, seqs, starts, ends, split=True) -> list[torch.Tensor]:
    """Compute tokens [start, end) of each sequence in one batch; logits per sequence."""
    ids = torch.cat([s[a:b] for s, a, b in zip(seqs, starts, ends, strict=True)])
    pos = torch.cat([torch.arange(a, b) for a, b in zip(starts, ends, strict=True)])
    qlens = [b - a for a, b in zip(starts, ends, strict=True)]
    meta = build_metadata(qlens, list(ends), _tables(), BLOCK, split=split)
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
    hf, model, tol = pair
    ours = _forward(model, prompts, [0] * len(prompts), [len(p) for p in prompts])
    for got, want in zip(ours, _reference(hf, prompts), strict=True):
        torch.testing.assert_close(got, want, atol=tol, rtol=0)


def test_chunked_prefill_then_decode_matches_transformers(pair, prompts):
    hf, model, tol = pair
    want = _reference(hf, prompts)
    # Prefill a first chunk of each, a second chunk, then decode the rest one token per step;
    # sequences of different lengths join and leave the decode batch at different steps.
    first = [2, 4, 6]
    second = [3, 8, 9]
    for a, b in ((0, first), (first, second)):
        starts = [0] * len(prompts) if a == 0 else a
        got = _forward(model, prompts, starts, b)
        for g, w, s, e in zip(got, want, starts, b, strict=True):
            torch.testing.assert_close(g, w[s:e], atol=tol, rtol=0)
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
            torch.testing.assert_close(logits[row], want[i][pos[i]], atol=tol, rtol=0)
            pos[i] += 1


def test_step_mixing_decode_and_prompt_chunks_matches_transformers(pair, prompts):
    # Continuous batching: sequences decoding one token share a step with another's prompt
    # chunk. They attend in two parts, so the decoding ones are not padded to the chunk.
    hf, model, tol = pair
    want = _reference(hf, prompts)
    first, second = [4, 2, 6], [5, 9, 7]  # then: decode, a chunk of 7, decode
    mixed = build_metadata([1, 7, 1], second, _tables(), BLOCK)
    assert mixed.parts and mixed.attn_mask is None  # the padded layout is not built beside
    assert not build_metadata([1, 7, 1], second, _tables(), BLOCK, split=False).parts
    for split in (True, False):  # and padded into one batch, as benchmarks/mixed_step.py does
        for starts, ends in (([0, 0, 0], first), (first, second)):
            got = _forward(model, prompts, starts, ends, split)
            for g, w, s, e in zip(got, want, starts, ends, strict=True):
                torch.testing.assert_close(g, w[s:e], atol=tol, rtol=0)
