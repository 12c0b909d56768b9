"""Structured output's cost: decode tokens/s of JSON-schema-constrained requests against free
ones, at batch 1 and 32, in one engine on the real model (interleaved rounds, median).

Both kinds generate exactly `--tokens` tokens: the free ones ignore EOS, the constrained ones
write an array of at least 64 records, which no run finishes first. The time counted is decode
only (from each batch's first sampled token to its last), so prefill does not dilute it.

    python benchmarks/structured.py                                 # SmolLM2, batch 1 and 32
    python benchmarks/structured.py --model qwen2.5-coder-0.5b-instruct --out results/x.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from thrifty import LLM, SamplingParams
from thrifty.engine.structured import Constraint

RECORDS = {
    "type": "array",
    "minItems": 64,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"enum": ["Paris", "Rome", "Tokyo", "Lima"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        },
        "required": ["name", "age", "city"],
    },
}
PROMPT = [{"role": "user", "content": "List people as JSON records with name, age and city."}]


def decode_rate(llm: LLM, batch: int, params: SamplingParams) -> float:
    """Tokens/s of decode for `batch` copies of PROMPT under `params`."""
    engine = llm.engine
    ids = llm._chat_ids(PROMPT)
    rids = [engine.add_request(ids, params) for _ in range(batch)]
    start = None
    tokens = 0
    while engine.has_unfinished():
        outs = engine.step()
        if start is None and outs:  # the prefill step sampled the first tokens
            start = time.perf_counter()
            continue
        tokens += sum(len(o.token_ids) for o in outs)
    elapsed = time.perf_counter() - start
    for rid in rids:
        seqs = engine.pop_finished(rid).seqs
        assert all(s.num_output_tokens == params.max_tokens for s in seqs), "a run ended early"
    return tokens / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, progress=False)
    free = SamplingParams(max_tokens=args.tokens, temperature=0.7, ignore_eos=True, seed=0)
    constrained = SamplingParams(
        max_tokens=args.tokens, temperature=0.7, seed=0,
        constraint=Constraint("json_schema", json.dumps(RECORDS)),
    )  # fmt: skip
    decode_rate(llm, 2, constrained)  # warm-up: the grammar's tokenizer, kernels, caches
    rows = []
    cpu = platform.processor() or platform.machine()
    print(f"{args.model}, {args.threads} threads, {args.tokens} tokens a sequence, {cpu}")
    print("| batch | free tok/s | constrained tok/s | constrained / free |")
    print("|---|---|---|---|")
    for batch in args.batches:
        rates: dict[str, list[float]] = {"free": [], "constrained": []}
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            rates["free"].append(decode_rate(llm, batch, free))
            rates["constrained"].append(decode_rate(llm, batch, constrained))
        f, c = (statistics.median(rates[k]) for k in ("free", "constrained"))
        rows.append({"batch": batch, "free": f, "constrained": c, "runs": rates})
        print(f"| {batch} | {f:.1f} | {c:.1f} | {c / f:.3f} |", flush=True)
    if args.out:
        meta = {"model": args.model, "threads": args.threads, "tokens": args.tokens,
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
