"""DeepSeek-V3's MTP layer as a draft for self-speculative decoding.

The tiny model's MTP layer is constructed to agree often with the main model: the main layers'
residual updates are damped, so the main model's next token is close to a function of the current
token alone, and the MTP layer passes the embedding of the token it is given through a damped
block to the shared head, which predicts just that function one token further on.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_deepseek import write_tokenizer

from thrifty.config import EngineConfig, ModelConfig
from thrifty.engine.llm_engine import LLMEngine
from thrifty.engine.sampling_params import SamplingParams
from thrifty.errors import ThriftyError
from thrifty.loader.weights import load_model

VOCAB = 64
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=24,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    n_shared_experts=1,
    first_k_dense_replace=1,
    max_position_embeddings=256,
    num_nextn_predict_layers=1,
)
DAMPED = ("o_proj.weight", "down_proj.weight")


def make_mtp_checkpoint(
    path, main_damping=0.3, mtp_damping=0.1, head_scale=20.0, embed_scale=1.0, seed=0, config=None
):
    """A tiny DeepSeek-V3 with an MTP layer at model.layers.{num_layers}, as the release has."""
    config = config or CONFIG
    torch.manual_seed(seed)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**config)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(DAMPED) or ".experts." in name and "down" in name:
                p.mul_(main_damping)
        hf.lm_head.weight.mul_(head_scale)  # peaked distributions, so sampling has structure
        hf.model.embed_tokens.weight.mul_(embed_scale)  # the token's share of the residual
    hf.save_pretrained(path)
    t = load_file(path / "model.safetensors")
    n, h = config["num_hidden_layers"], config["hidden_size"]
    for name in [k for k in t if k.startswith(f"model.layers.{n - 1}.")]:
        new = name.replace(f"model.layers.{n - 1}.", f"model.layers.{n}.")
        t[new] = t[name].clone() * (mtp_damping if name.endswith(DAMPED) else 1.0)
    eh = torch.zeros(h, 2 * h)
    eh[:, :h] = torch.eye(h)  # [enorm(emb(x_{t+1})), hnorm(h_t)] -> mostly the token
    eh[:, h:] = torch.randn(h, h) * 0.01
    t |= {
        f"model.layers.{n}.enorm.weight": torch.ones(h),
        f"model.layers.{n}.hnorm.weight": torch.ones(h),
        f"model.layers.{n}.eh_proj.weight": eh,
        f"model.layers.{n}.shared_head.norm.weight": t["model.norm.weight"].clone(),
        f"model.layers.{n}.shared_head.head.weight": t["lm_head.weight"].clone(),
        f"model.layers.{n}.embed_tokens.weight": t["model.embed_tokens.weight"].clone(),
    }
    save_file(t, path / "model.safetensors")
    write_tokenizer(path, config["vocab_size"])
    return hf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mtp")
    hf = make_mtp_checkpoint(path)
    return path, hf


def _engine(path, k: int, **kw) -> LLMEngine:
    config = EngineConfig(
        dtype=torch.float32,
        block_size=4,
        num_kv_blocks=kw.pop("blocks", 256),
        num_speculative_tokens=k,
        max_num_seqs=kw.pop("max_num_seqs", 64),
        **kw,
    )
    return LLMEngine(path, config)


def _run(engine: LLMEngine, prompts, params_of) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(p, params_of(i), request_id=str(i))
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    return out


def _prompts(n: int, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 14, (n,), generator=g).tolist()
    return [torch.randint(2, VOCAB, (m,), generator=g).tolist() for m in lengths]


def test_mtp_layer_loads_and_a_checkpoint_without_it_runs_without(checkpoint, tmp_path):
    path, hf = checkpoint
    cfg = ModelConfig.from_dir(path)
    assert load_model(path, cfg, dtype=torch.float32).num_mtp_layers == 1
    hf.save_pretrained(tmp_path)  # transformers writes no MTP tensors
    assert load_model(tmp_path, cfg, dtype=torch.float32).num_mtp_layers == 0
    write_tokenizer(tmp_path, VOCAB)
    with pytest.raises(ThriftyError, match="MTP layers"):
        _engine(tmp_path, 2)
    # The MTP layer is only a draft: it gets a cache layer only when speculation is on.
    layers = CONFIG["num_hidden_layers"]
    assert _engine(path, 0).runner.kv_cache.shape[0] == layers
    assert _engine(path, 2).runner.kv_cache.shape[0] == layers + 1


def test_partial_mtp_layer_is_refused(checkpoint, tmp_path):
    path, _ = checkpoint
    t = load_file(path / "model.safetensors")
    name = "model.layers.2.mlp.experts.1.gate_proj.weight"
    del t[name]
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(t, tmp_path / "model.safetensors")
    with pytest.raises(ThriftyError, match=name):
        load_model(tmp_path, ModelConfig.from_dir(tmp_path), dtype=torch.float32)


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_outputs_identical_with_and_without_mtp(checkpoint, k):
    path, _ = checkpoint
    prompts = _prompts(6)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    plain = _run(_engine(path, 0), prompts, lambda i: params)
    # Chunked prefill (8-token budget) and a prefix shared through the cache on the way.
    spec_engine = _engine(path, k, max_num_batched_tokens=8)
    spec = _run(spec_engine, [*prompts, prompts[0] + [5]], lambda i: params)
    for i in range(len(prompts)):
        assert spec[str(i)] == plain[str(i)], i
    stats = spec_engine.spec.stats
    assert stats.drafted > 0
    assert stats.acceptance_rate > 0.5, stats  # constructed to agree often
    assert stats.tokens_per_verification > 1.4


def test_greedy_identical_under_preemption(checkpoint):
    """A cache too small for all sequences: preempted sequences drop their drafts, and the
    blocks that drafts hold are given back like any others."""
    path, _ = checkpoint
    prompts = _prompts(6, seed=5)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    plain = _run(_engine(path, 0), prompts, lambda i: params)
    spec_engine = _engine(path, 2, blocks=24)
    assert _run(spec_engine, prompts, lambda i: params) == plain
    assert spec_engine.scheduler.num_preemptions > 0


def _chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test, bins with expected count < 5 pooled; Wilson-Hilferty for the tail."""
    n = counts.sum().item()
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_sampled_outputs_keep_the_target_distribution(checkpoint):
    """Tokens 2 and 3 of sampled outputs (the first ones that verification emits) against the
    exact distribution computed from transformers' model."""
    path, hf = checkpoint
    prompt = [7, 19, 33, 2, 50]
    temperature = 1.5
    n = 3000
    with torch.inference_mode():  # the exact joint of tokens 1..3, from the reference model
        p1 = (hf(torch.tensor([prompt])).logits[0, -1] / temperature).softmax(-1)  # (V,)
        seqs = torch.tensor([[*prompt, a] for a in range(VOCAB)])
        p2 = (hf(seqs).logits[:, -1] / temperature).softmax(-1)  # (V, V): t1 -> t2
        seqs3 = torch.tensor([[*prompt, a, b] for a in range(VOCAB) for b in range(VOCAB)])
        p3 = (hf(seqs3).logits[:, -1] / temperature).softmax(-1).view(VOCAB, VOCAB, VOCAB)
    joint12 = p1[:, None] * p2  # (t1, t2)
    marg2 = joint12.sum(0)
    marg3 = (joint12[:, :, None] * p3).sum((0, 1))

    engine = _engine(path, 2, blocks=2048, max_num_seqs=512, max_num_batched_tokens=4096)
    out = _run(
        engine,
        [prompt] * n,
        lambda i: SamplingParams(max_tokens=3, temperature=temperature, seed=i, ignore_eos=True),
    )
    tokens = torch.tensor([out[str(i)] for i in range(n)])
    stats = engine.spec.stats
    assert 0.2 < stats.acceptance_rate < 0.95, stats  # both acceptance and rejection exercised
    c2 = torch.bincount(tokens[:, 1], minlength=VOCAB).double()
    c3 = torch.bincount(tokens[:, 2], minlength=VOCAB).double()
    assert _chi_square_pvalue(c2, marg2.double()) > 1e-3
    assert _chi_square_pvalue(c3, marg3.double()) > 1e-3
    # The test has power: token 1's counts are told apart from token 2's law.
    c1 = torch.bincount(tokens[:, 0], minlength=VOCAB).double()
    assert _chi_square_pvalue(c1, marg2.double()) < 1e-6


def test_server_serves_deepseek_with_mtp(checkpoint):
    """`thrifty serve` on the tiny DeepSeek-V3 with MTP drafting, through the openai client:
    the greedy completion equals the engine's plain decoding."""
    import openai
    from test_server import launch

    path, _ = checkpoint
    prompt = "t7 t19 t33 t2 t50"
    engine = _engine(path, 0)
    engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=0))
    want = ""
    while engine.has_unfinished():
        want += "".join(o.delta_text for o in engine.step())
    with launch("--dtype", "float32", "--num-speculative-tokens", "2", model=str(path)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        out = client.completions.create(
            model=path.name, prompt=prompt, max_tokens=12, temperature=0
        )
    assert out.choices[0].text == want and len(want.split()) > 3
