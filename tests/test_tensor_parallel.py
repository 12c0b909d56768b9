"""Tensor and expert parallelism on 2 gloo processes: the same greedy tokens as one process.

Tiny random Llama / Qwen2 (one KV head, replicated on both ranks) / Qwen3 (qk-norm, tied
head) / DeepSeek-V3 (MLA, grouped routing, shared experts, experts split over the ranks with
all-to-all dispatch and combine), each run in a subprocess (tests/tp_generate.py) that spawns its
second rank; the same for Qwen2 and DeepSeek-V3 with dimensions 2 ranks do not divide (SmolLM2's
9 query heads over 3 KV heads, odd MLP, vocabulary and expert counts), an FP8 DeepSeek-V3 split
on its 128x128 blocks, and GGUF files whose slices stay quantized. Also: which slice of each
checkpoint tensor a rank loads, and `thrifty serve --tensor-parallel-size 2` through the openai
client, its shutdown and a rank's death.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
import torch
import tp_generate
import transformers
from gguf import GGMLQuantizationType as T
from safetensors.torch import load_file
from test_quant_gguf import _blocks, _write_tiny_gguf
from test_server import KEY, MODEL, launch, openai_client

from thrifty import distributed, hub
from thrifty.config import ModelConfig
from thrifty.errors import ThriftyError
from thrifty.loader import weights
from thrifty.loader.gguf import convert_gguf
from thrifty.loader.gguf_weights import GgufTensor
from thrifty.loader.weights import load_model
from thrifty.models.moe import RemoteExpert, expert_owner
from thrifty.quant import ggml
from thrifty.quant.checkpoint import quantize_checkpoint

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
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2-one-kv-head": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        {"num_key_value_heads": 1, "tie_word_embeddings": False},
    ),
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        {"head_dim": 32, "tie_word_embeddings": True},
    ),
    "deepseek-v3": (
        transformers.DeepseekV3Config,
        transformers.DeepseekV3ForCausalLM,
        dict(
            num_hidden_layers=3,
            num_key_value_heads=4,
            moe_intermediate_size=32,
            kv_lora_rank=32,
            q_lora_rank=48,
            qk_rope_head_dim=16,
            qk_nope_head_dim=32,
            v_head_dim=24,
            n_routed_experts=8,
            num_experts_per_tok=3,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
        ),
    ),
}
# Dimensions 2 ranks do not divide: SmolLM2's 9 query heads over 3 KV heads (rank 0 takes KV heads
# 0 and 1 and their 6 queries, rank 1 the last 3), 97 MLP columns (49 + 48), a vocabulary of 301
# (151 + 150); for DeepSeek-V3 3 MLA heads, 9 experts (5 + 4) and 33 shared-expert columns.
UNEVEN = dict(num_attention_heads=9, num_key_value_heads=3, intermediate_size=97, vocab_size=301)
CASES["qwen2-uneven"] = (
    transformers.Qwen2Config,
    transformers.Qwen2ForCausalLM,
    {**UNEVEN, "head_dim": 16, "tie_word_embeddings": False},
)
CASES["deepseek-v3-uneven"] = (
    transformers.DeepseekV3Config,
    transformers.DeepseekV3ForCausalLM,
    {
        **CASES["deepseek-v3"][2],
        **UNEVEN,
        "num_attention_heads": 3,
        "n_routed_experts": 9,
        "n_group": 3,
        "moe_intermediate_size": 33,
    },
)
# DeepSeek-V3's FP8 layout splits on whole 128x128 blocks: a rank's rows of q_b_proj (2 heads of
# 64 + 64), kv_b_proj (2 x (64 + 64)), o_proj's columns (2 x 64), the MLP's and the shared
# experts' 128 columns each.
FP8_CASE = dict(
    hidden_size=256,
    intermediate_size=256,
    moe_intermediate_size=128,
    n_shared_experts=2,
    kv_lora_rank=128,
    q_lora_rank=128,
    qk_rope_head_dim=64,
    qk_nope_head_dim=64,
    v_head_dim=64,
)
PROMPTS = [[(7 * i + 3 * j) % 300 for j in range(n)] for i, n in enumerate((5, 11, 17))]


def tiny(case: str, path: Path, **more) -> Path:
    """A tiny random checkpoint of `case` with SmolLM2's tokenizer files (prompts are ids)."""
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**{**COMMON, **extra, **more})).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: make them count
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path)
    source = hub.resolve("smollm2-135m-instruct", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, path / name)
    return path


def _two_ranks(path: Path, prompts: list[list[int]] = PROMPTS) -> list[list[int]]:
    script = Path(__file__).with_name("tp_generate.py")
    run = subprocess.run(
        [sys.executable, str(script), str(path), "2", json.dumps(prompts)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def shared_memory_here() -> bool:
    """Whether this machine can hold the ranks' segment (a writable /dev/shm with room): where
    it cannot, gloo carries the collectives, and the tests below expect that instead."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return False
    return os.access("/dev/shm", os.W_OK) and st.f_bavail * st.f_frsize >= 16 << 20


@pytest.mark.parametrize("shm", ["1", "0"], ids=["shared memory", "gloo"])
def test_collectives_on_two_ranks(shm):
    """All-reduce (float32, bf16, a transposed view, in several rounds of a 4 KiB slot), uneven
    all-gather and the step's broadcast give what gloo gives; the segment's file is gone once
    mapped; a rank that dies makes its peer's wait raise within seconds, not hang."""
    script = Path(__file__).with_name("tp_collectives.py")
    run = subprocess.run(
        [sys.executable, str(script), "4096"],
        env={**os.environ, "THRIFTY_SHM_COLLECTIVES": shm},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    shared = shm == "1" and shared_memory_here()
    assert result.pop("transport") == ("shared memory" if shared else "gloo")
    dead, seconds = result.pop("a dead peer"), result.pop("seconds to notice")
    assert all(result.values()), result
    assert dead != "no error" and seconds < 10, (dead, seconds)
    if shared:
        assert "rank 1" in dead and "is gone" in dead


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_decode_the_tokens_of_one(case, tmp_path):
    path = tiny(case, tmp_path)
    one = tp_generate.generate(str(path), 1, PROMPTS)
    assert [len(t) for t in one] == [4, 7, 10]
    assert _two_ranks(path) == one


def test_two_ranks_of_an_fp8_checkpoint(tmp_path):
    """Each rank reads its FP8 weights' slices and their 128x128 block scales."""
    dense = tiny("deepseek-v3", tmp_path / "dense", **FP8_CASE)
    path = quantize_checkpoint(dense, tmp_path / "fp8", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(dense / name, path / name)
    assert "model.layers.1.self_attn.q_b_proj.weight_scale_inv" in load_file(
        path / "model.safetensors"
    )
    one = tp_generate.generate(str(path), 1, PROMPTS)
    assert _two_ranks(path) == one


def test_fp8_blocks_a_rank_would_cut_are_refused(tmp_path):
    """The tiny DeepSeek-V3's 96 MLP columns give each of 2 ranks 48: half a block."""
    dense = tiny("deepseek-v3", tmp_path / "dense")
    path = quantize_checkpoint(dense, tmp_path / "fp8", progress=False)
    script = Path(__file__).with_name("tp_generate.py")
    run = subprocess.run(
        [sys.executable, str(script), str(path), "2", json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    assert "cannot be split over 2 ranks on its 128x128 blocks" in run.stderr


@pytest.fixture
def as_rank_1_of_2(monkeypatch):
    """Build models as rank 1 of 2 would (construction and loading need no process group)."""
    monkeypatch.setattr(distributed, "_rank", 1)
    monkeypatch.setattr(distributed, "_world_size", 2)
    monkeypatch.setattr(weights, "pack_linears", lambda model: 0)  # checkpoint layouts to compare


def test_rank_loads_its_slices(tmp_path, as_rank_1_of_2):
    path = tiny("qwen2-one-kv-head", tmp_path / "qwen2")
    full = load_file(path / "model.safetensors")
    model = load_model(path, ModelConfig.from_dir(path), dtype=torch.float32)
    layer = model.model.layers[1]
    p = "model.layers.1.self_attn."
    # Heads 2 and 3 of q; the only KV head, replicated; o_proj's input columns of heads 2, 3.
    q, k, v = (full[p + f"{x}_proj.weight"] for x in "qkv")
    assert torch.equal(layer.self_attn.qkv_proj.weight, torch.cat((q[32:], k, v)))
    qb, kb = full[p + "q_proj.bias"], full[p + "k_proj.bias"]
    assert torch.equal(layer.self_attn.qkv_proj.bias[:32], qb[32:])
    assert torch.equal(layer.self_attn.qkv_proj.bias[32:48], kb)
    assert torch.equal(layer.self_attn.o_proj.weight, full[p + "o_proj.weight"][:, 32:])
    m = "model.layers.1.mlp."
    gate, up = full[m + "gate_proj.weight"], full[m + "up_proj.weight"]
    assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat((gate[48:], up[48:])))
    assert torch.equal(layer.mlp.down_proj.weight, full[m + "down_proj.weight"][:, 48:])
    assert torch.equal(model.model.embed_tokens.weight, full["model.embed_tokens.weight"][150:])
    assert torch.equal(model.lm_head.weight, full["lm_head.weight"][150:])
    assert torch.equal(model.model.norm.weight, full["model.norm.weight"])  # replicated


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_loads_its_uneven_slices(tmp_path, monkeypatch, rank):
    """3 KV heads over 2 ranks: rank 0 holds KV heads 0, 1 and their query heads 0-5, rank 1 KV
    head 2 and query heads 6-8; 97 MLP columns and 301 vocabulary rows split 49/48, 151/150."""
    monkeypatch.setattr(distributed, "_rank", rank)
    monkeypatch.setattr(distributed, "_world_size", 2)
    monkeypatch.setattr(weights, "pack_linears", lambda model: 0)
    path = tiny("qwen2-uneven", tmp_path / "qwen2")
    full = load_file(path / "model.safetensors")
    model = load_model(path, ModelConfig.from_dir(path), dtype=torch.float32)
    attn, p = model.model.layers[1].self_attn, "model.layers.1.self_attn."
    heads, kv_heads = (range(0, 6), range(0, 2)) if rank == 0 else (range(6, 9), range(2, 3))
    assert (attn.num_heads, attn.num_kv_heads) == (len(heads), len(kv_heads))
    rows = slice(16 * heads[0], 16 * (heads[-1] + 1))
    kv_rows = slice(16 * kv_heads[0], 16 * (kv_heads[-1] + 1))
    q, k, v = (full[p + f"{x}_proj.weight"] for x in "qkv")
    assert torch.equal(attn.qkv_proj.weight, torch.cat((q[rows], k[kv_rows], v[kv_rows])))
    qb, kb, vb = (full[p + f"{x}_proj.bias"] for x in "qkv")
    assert torch.equal(attn.qkv_proj.bias, torch.cat((qb[rows], kb[kv_rows], vb[kv_rows])))
    assert torch.equal(attn.o_proj.weight, full[p + "o_proj.weight"][:, rows])
    m, cols = "model.layers.1.mlp.", slice(0, 49) if rank == 0 else slice(49, 97)
    gate, up = full[m + "gate_proj.weight"], full[m + "up_proj.weight"]
    assert torch.equal(
        model.model.layers[1].mlp.gate_up_proj.weight, torch.cat((gate[cols], up[cols]))
    )
    assert torch.equal(
        model.model.layers[1].mlp.down_proj.weight, full[m + "down_proj.weight"][:, cols]
    )
    vocab = slice(0, 151) if rank == 0 else slice(151, 301)
    assert torch.equal(model.model.embed_tokens.weight, full["model.embed_tokens.weight"][vocab])
    assert model.model.embed_tokens.vocab_start == vocab.start
    assert torch.equal(model.lm_head.weight, full["lm_head.weight"][vocab])
    assert model.lm_head.vocab_sizes == [151, 150]


def test_experts_are_dealt_in_near_equal_runs():
    """expert_owner (the all-to-all's destinations) agrees with the experts each rank builds."""
    for num_experts, world in [(9, 2), (8, 2), (10, 4), (3, 4)]:
        owners = [
            r for r in range(world) for _ in range(distributed.chunk(num_experts, world, r)[1])
        ]
        assert expert_owner(torch.arange(num_experts), num_experts, world).tolist() == owners
    assert expert_owner(torch.arange(9), 9, 2).tolist() == [0] * 5 + [1] * 4


def test_rank_loads_its_experts(tmp_path, as_rank_1_of_2):
    path = tiny("deepseek-v3", tmp_path / "ds")
    full = load_file(path / "model.safetensors")
    model = load_model(path, ModelConfig.from_dir(path), dtype=torch.float32)
    experts = model.model.layers[1].mlp.experts
    assert [isinstance(e, RemoteExpert) for e in experts] == [True] * 4 + [False] * 4
    e5 = "model.layers.1.mlp.experts.5."
    assert torch.equal(
        experts[5].gate_up_proj.weight,
        torch.cat((full[e5 + "gate_proj.weight"], full[e5 + "up_proj.weight"])),
    )
    attn, a = model.model.layers[1].self_attn, "model.layers.1.self_attn."
    assert attn.num_heads == 2
    assert torch.equal(attn.kv_b_proj.weight, full[a + "kv_b_proj.weight"][2 * 56 :])
    assert torch.equal(attn.q_b_proj.weight, full[a + "q_b_proj.weight"][2 * 48 :])
    assert torch.equal(attn.kv_a_proj_with_mqa.weight, full[a + "kv_a_proj_with_mqa.weight"])


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q4_K], ids=lambda t: t.name)
def test_a_gguf_slice_reads_only_its_bytes(qtype):
    """Rows in the model's order (q's llama.cpp permutation undone by picking them) and columns
    cut between blocks: their bytes only, equal to the whole tensor's slice, dequantized or
    repacked; a cut inside a block (Q4_K's 256) is left to the caller."""
    raw = _blocks(qtype, 12, 512, np.random.default_rng(0))
    tensor = GgufTensor("blk.0.attn_q.weight", torch.Size((12, 512)), qtype, raw, num_heads=2)
    whole = tensor.dequantize()
    rows = tensor.narrow(0, 4, 6)
    assert rows is not None and rows.data.nbytes == raw.nbytes // 2
    assert torch.equal(rows.dequantize(), whole[4:10])
    assert torch.equal(ggml.dequantize(*rows.quantized()), whole[4:10])
    columns = tensor.narrow(1, 256, 256)
    assert columns is not None and columns.data.nbytes == raw.nbytes // 2
    assert torch.equal(columns.dequantize(), whole[:, 256:])
    assert torch.equal(ggml.dequantize(*columns.quantized()), whole[:, 256:])
    cut = tensor.narrow(1, 128, 384)
    assert (cut is None) == (qtype == T.Q4_K)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_gguf(request, tmp_path_factory) -> Path:
    """test_quant_gguf's tiny GGUF: mixed quantized types, 2 KV heads, converted."""
    tmp = tmp_path_factory.mktemp(request.param)
    _write_tiny_gguf(tmp / "tiny.gguf", request.param, np.random.default_rng(5))
    return convert_gguf(tmp / "tiny.gguf", tmp / "converted", progress=False)


def test_a_rank_keeps_its_gguf_slices_quantized(tiny_gguf, monkeypatch):
    """Rank 1 of 2 holds the second half of each split weight in the format one process keeps
    (ggml's q4/q5/q8), with the same values."""
    cfg = ModelConfig.from_dir(tiny_gguf)
    whole = load_model(tiny_gguf, cfg, dtype=torch.float32)
    monkeypatch.setattr(distributed, "_rank", 1)
    monkeypatch.setattr(distributed, "_world_size", 2)
    half = load_model(tiny_gguf, cfg, dtype=torch.float32)
    for name in ("self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        one = whole.get_submodule(f"model.layers.1.{name}")
        mine = half.get_submodule(f"model.layers.1.{name}")
        assert mine.weight.dtype in (torch.uint8, torch.int8), name
        assert ggml.format_of(mine.weight, mine.weight_scale_inv) == ggml.format_of(
            one.weight, one.weight_scale_inv
        )
        full = ggml.dequantize(one.weight, one.weight_scale_inv)
        if name == "mlp.gate_up_proj":  # rank 1's rows of gate, then of up
            expected = torch.cat((full[256:512], full[768:]))
        elif name == "mlp.down_proj":
            expected = full[:, 256:]
        else:
            expected = full[:, 128:]
        assert torch.equal(ggml.dequantize(mine.weight, mine.weight_scale_inv), expected)
    embed = half.model.embed_tokens
    assert ggml.format_of(embed.weight, embed.weight_scale_inv) == ("q8", 32)
    assert embed.weight.shape[0] == 48


def test_two_ranks_of_a_gguf_decode_the_tokens_of_one(tiny_gguf):
    prompts = [[(5 * i + 3 * j) % 96 for j in range(n)] for i, n in enumerate((5, 11, 17))]
    one = tp_generate.generate(str(tiny_gguf), 1, prompts)
    assert _two_ranks(tiny_gguf, prompts) == one


def test_indivisible_heads_are_refused(tmp_path, monkeypatch):
    path = tiny("llama", tmp_path)
    monkeypatch.setattr(distributed, "_world_size", 3)
    with pytest.raises(ThriftyError, match="over 3 ranks"):
        load_model(path, ModelConfig.from_dir(path), dtype=torch.float32)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# SmolLM2-135M, the default: 3 KV heads over 2 ranks (2 and 1). The whole server suite runs
# against TP=2 with `pytest tests/test_server*.py tests/test_chat_page.py --tensor-parallel-size 2`.
SERVE = ("--tensor-parallel-size", "2", "--num-threads", "1", "--max-model-len", "512")

# Two ranks sum the row-parallel layers' halves after each rounds its own to bf16, so greedy
# decoding may part from one process's where two tokens tie within the logits' rounding. "What
# is the capital of France?" opens on such a tie ("The" against "L", 0.125 apart: one bf16 step
# of a logit near 16), so a change of kernel flips it; this question's answer parts from its
# runner-up by 1.1 or more at every token (logprobs, one process, bf16).
QUESTION = "Name the capital of France."


@pytest.mark.slow
def test_server_with_two_ranks(smollm2_gguf):
    procs: list = []
    # Each rank keeps its heads' keys and values in bfloat16 (--kv-cache-dtype).
    args = (*SERVE, "--kv-cache-dtype", "bfloat16")
    with launch(*args, env={"THRIFTY_API_KEY": KEY}, procs=procs) as url:
        client = openai_client(url)
        question = [{"role": "user", "content": QUESTION}]
        full = client.chat.completions.create(
            model=MODEL, messages=question, max_tokens=16, temperature=0
        )
        assert "Paris" in full.choices[0].message.content
        stream = client.chat.completions.create(
            model=MODEL, messages=question, max_tokens=16, temperature=0, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == full.choices[0].message.content
        # The weights of both ranks: rank 0 holds 2 of the 3 KV heads and their queries.
        status = httpx.get(f"{url}/thrifty/status", headers={"Authorization": f"Bearer {KEY}"})
        ranks_bytes = status.json()["rank_weight_bytes"]
        assert len(ranks_bytes) == 2 and ranks_bytes[0] > ranks_bytes[1] > 0
        assert status.json()["weight_bytes"] == sum(ranks_bytes)
        assert status.json()["kv_cache_dtype"] == "bfloat16"
        # Both ranks on this host: through shared memory wherever it can be had.
        want = "shared memory" if shared_memory_here() else "gloo"
        assert status.json()["collectives"] == want
        server = procs[0]
        ranks = [p for p in _children(server.pid) if _alive(p)]
        assert ranks, "rank 1 is not a child of the server"
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) is not None
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in ranks), "a rank outlived the server"


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_server(smollm2_gguf):
    procs: list = []
    with launch(*SERVE, procs=procs):
        server = procs[0]
        rank = next(p for p in _children(server.pid) if b"spawn_main" in _cmdline(p))
        os.kill(rank, signal.SIGKILL)
        assert server.wait(timeout=30) == 1
        log = b"".join(server.log).decode(errors="replace")
        assert "error: tensor-parallel rank 1 exited" in log


def test_run_with_two_ranks_answers_as_one(smollm2_gguf):
    """`thrifty run --tensor-parallel-size 2` spawns its second rank, answers, and leaves none
    behind: SmolLM2's greedy answer on 2 ranks (3 KV heads: 2 and 1) is one process's."""
    greedy = [QUESTION, "--temperature", "0", "--max-tokens", "24"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "thrifty", "run", MODEL, *greedy, *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    one, two = run(), run("--tensor-parallel-size", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert "Paris" in one.stdout and two.stdout == one.stdout
