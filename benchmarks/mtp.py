"""Self-speculative decoding with DeepSeek-V3's MTP layer: acceptance rate and decode speed-up.

No small DeepSeek-V3 checkpoint with an MTP layer is available offline, so the model is a random
DeepSeek-V3 (8 layers, hidden 512, latent attention, 8 routed experts + 1 shared) whose MTP
layer is constructed to agree often with it (`tests/test_mtp.py`: large token embeddings and damped
residual updates in the main model, so that its next token is mostly a function of the current
one, and an MTP layer that mostly passes the next token's embedding to the shared head). The
acceptance rate is therefore a property of that construction, not of DeepSeek-V3's trained MTP
(DeepSeek reports 85-90% for its second token); the speed-up for a given acceptance rate is what
this measures. Every run's greedy tokens are checked equal to plain decoding's.

    python benchmarks/mtp.py                       # fp32, 1 thread, batch 1 and 8, k = 0..3
    python benchmarks/mtp.py --batch 1 --k 0 2 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from thrifty.config import EngineConfig, parse_dtype
from thrifty.engine.llm_engine import LLMEngine
from thrifty.engine.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from test_mtp import make_mtp_checkpoint  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CONFIG = dict(
    vocab_size=2048,
    hidden_size=512,
    intermediate_size=1024,
    moe_intermediate_size=384,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    kv_lora_rank=256,
    q_lora_rank=256,
    qk_rope_head_dim=32,
    qk_nope_head_dim=64,
    v_head_dim=64,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    n_shared_experts=1,
    first_k_dense_replace=1,
    max_position_embeddings=1024,
    num_nextn_predict_layers=1,
)


class Runner:
    """One engine with k draft tokens; `generate` decodes the batch's prompts once."""

    def __init__(self, path: Path, k: int, batch: int, args):
        config = EngineConfig(
            dtype=parse_dtype(args.dtype),
            num_speculative_tokens=k,
            max_num_seqs=batch,
            kv_cache_memory_bytes=256 << 20,
            num_threads=args.threads,
        )
        self.k, self.batch = k, batch
        self.engine = LLMEngine(path, config)
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(2, CONFIG["vocab_size"], (16,), generator=g).tolist()
        self.prompts = [[i + 2, *prompt[1:]] for i in range(batch)]  # distinct: no shared cache
        self.params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        self.times: list[float] = []
        self.generate()  # warm up (kernels, allocator)
        self.times.clear()
        if self.engine.spec is not None:
            self.engine.spec.stats = type(self.engine.spec.stats)()

    def generate(self) -> None:
        engine = self.engine
        ids = [engine.add_request(p, self.params) for p in self.prompts]
        out: dict[str, list[int]] = {i: [] for i in ids}
        steps, t0 = 0, time.perf_counter()
        while engine.has_unfinished():
            for o in engine.step():
                out[o.request_id] += o.token_ids
            steps += 1
        self.times.append(time.perf_counter() - t0)
        self.steps, self.outputs = steps, [out[i] for i in ids]

    def row(self) -> dict:
        seconds = sorted(self.times)[len(self.times) // 2]
        stats = self.engine.spec.stats if self.engine.spec is not None else None
        return {
            "k": self.k,
            "batch": self.batch,
            "tokens_per_s": sum(len(o) for o in self.outputs) / seconds,
            "steps": self.steps,
            "acceptance_rate": stats.acceptance_rate if stats else None,
            "tokens_per_verification": stats.tokens_per_verification if stats else None,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # float32: greedy verification rows then round like plain decode rows, so the outputs can
    # be checked equal; in bf16, rows batched k + 1 at a time take other kernels (the GEMV
    # against oneDNN, expanded against absorbed attention) and near-ties can part ways.
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--k", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "mtp"), help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    ks = sorted(set([0, *args.k]))
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        make_mtp_checkpoint(
            path, config=CONFIG, main_damping=0.1, embed_scale=20.0, head_scale=40.0
        )
        for batch in args.batch:
            runners = [Runner(path, k, batch, args) for k in ks]
            for _ in range(args.rounds):  # interleaved, so a neighbour's load hits all alike
                for r in runners:
                    r.generate()
            base = runners[0].row()
            for r in runners:
                row = r.row()
                same = r.outputs == runners[0].outputs
                assert same or args.dtype != "float32", f"k={r.k}: greedy outputs differ"
                row["identical_to_plain"] = same
                row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
                rows.append(row)
                acc = "" if r.k == 0 else f", acceptance {row['acceptance_rate']:.1%}"
                print(
                    f"batch {batch} k={r.k}: {row['tokens_per_s']:7.1f} tok/s "
                    f"(x{row['speedup']:.2f}, {row['steps']} steps){acc}",
                    flush=True,
                )
            del runners
    meta = {
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "config": CONFIG,
        "torch": torch.__version__,
        "load_average": [load_before, os.getloadavg()[0]],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"MTP self-speculative decoding, constructed 8-layer DeepSeek-V3 ({args.dtype}, "
        f"{meta['threads']} threads), greedy, {args.max_tokens} tokens per sequence, median of "
        f"{args.rounds}; greedy outputs identical to k = 0: "
        f"{all(r['identical_to_plain'] for r in rows)}. 1-minute load average "
        f"{load_before:.1f} before, {meta['load_average'][1]:.1f} after: acceptance and steps do "
        "not depend on the load, tokens/s do.",
        "",
        "| batch | draft tokens k | tokens/s | speed-up | acceptance | tokens per verification "
        "| steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = "-" if r["k"] == 0 else f"{r['acceptance_rate']:.1%}"
        tpv = "-" if r["k"] == 0 else f"{r['tokens_per_verification']:.2f}"
        lines.append(
            f"| {r['batch']} | {r['k']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {acc} "
            f"| {tpv} | {r['steps']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
