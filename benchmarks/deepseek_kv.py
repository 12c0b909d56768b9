"""KV-cache bytes per token of DeepSeek's latent attention, from thrifty's own allocator.

For each configuration the model is built on the meta device (no weights) and handed to the
model runner, which sizes and allocates a real cache of `--budget-mib` MiB from the model's
declared per-token layout. The line compares that with what a cache of full per-head keys and
values (n_heads * (qk_nope + qk_rope + v) per layer) would need for the same model.

    python benchmarks/deepseek_kv.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from thrifty.config import EngineConfig, ModelConfig
from thrifty.engine.model_runner import ModelRunner, kv_bytes_per_token
from thrifty.models import model_class

RESULTS = Path(__file__).parent / "results"

# The attention-relevant fields of the released configs (config.json on the hub).
CONFIGS = {
    "DeepSeek-V3 (61 layers + 1 MTP)": dict(
        architectures=["DeepseekV3ForCausalLM"],
        num_hidden_layers=61,
        num_attention_heads=128,
        hidden_size=7168,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        num_nextn_predict_layers=1,
    ),
    "DeepSeek-V2 (60 layers)": dict(
        architectures=["DeepseekV2ForCausalLM"],
        num_hidden_layers=60,
        num_attention_heads=128,
        hidden_size=5120,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
    ),
    "DeepSeek-V2-Lite (27 layers)": dict(
        architectures=["DeepseekV2ForCausalLM"],
        num_hidden_layers=27,
        num_attention_heads=16,
        hidden_size=2048,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--budget-mib", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS / "mla_kv"), help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for name, fields in CONFIGS.items():
        # MoE does not change the cache layout; a small dense MLP keeps the meta build quick.
        cfg = ModelConfig.from_hf({**fields, "vocab_size": 1024, "intermediate_size": 64})
        cfg = dataclasses.replace(cfg, max_position_embeddings=16)
        with torch.device("meta"):
            model = model_class(cfg)(cfg)
        config = EngineConfig(dtype=dtype, kv_cache_memory_bytes=args.budget_mib << 20)
        runner = ModelRunner(model, cfg, config)
        m = cfg.mla
        cached_layers = runner.kv_cache.shape[0]
        per_token = kv_bytes_per_token(cfg, dtype, model)
        assert per_token == (m.kv_lora_rank + m.qk_rope_head_dim) * cached_layers * dtype.itemsize
        assert runner.kv_cache.nbytes == runner.num_blocks * config.block_size * per_token
        full = cached_layers * cfg.num_heads * (m.qk_head_dim + m.v_head_dim) * dtype.itemsize
        rows.append(
            {
                "model": name,
                "cached_layers": cached_layers,
                "latent_bytes_per_token": per_token,
                "full_head_bytes_per_token": full,
                "ratio": full / per_token,
                "tokens_in_budget": runner.num_blocks * config.block_size,
                "full_head_tokens_in_budget": (args.budget_mib << 20) // full,
            }
        )
        del runner, model
    lines = [
        f"KV cache per token ({args.dtype}): latent + rope key per layer, from the allocator, "
        f"against full per-head K and V; tokens that fit in {args.budget_mib} MiB.",
        "",
        "| model | cached layers | thrifty bytes/token | full-head bytes/token | ratio "
        "| tokens in budget (thrifty / full-head) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['cached_layers']} | {r['latent_bytes_per_token']:,} "
        f"| {r['full_head_bytes_per_token']:,} | {r['ratio']:.1f}x "
        f"| {r['tokens_in_budget']:,} / {r['full_head_tokens_in_budget']:,} |"
        for r in rows
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"dtype": args.dtype, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
