"""Random JSON schemas -> one constrained document each on a real model, every one checked by
jsonschema (an independent validator). All requests run as one continuous batch.

The schemas are drawn from a seed: nested objects, arrays with item counts, strings with
lengths, patterns, formats and enums, bounded and unbounded integers and numbers, booleans,
nulls, anyOf, optional properties.

    python benchmarks/random_schemas.py                                   # Qwen2.5-0.5B, 100
    python benchmarks/random_schemas.py --model smollm2-135m-instruct --count 20
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

WORDS = [
    "id", "name", "title", "city", "price", "count", "tags", "owner", "email", "date",
    "score", "active", "notes", "items", "size", "color", "rank", "kind", "code", "meta",
]  # fmt: skip
PATTERNS = ["^[A-Z][a-z]{2,8}$", "^[0-9]{3}-[0-9]{4}$", "^[a-z]+(_[a-z]+)?$"]
FORMATS = ["date", "email", "uuid", "date-time"]


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """One schema; objects nest up to three levels."""
    kinds = ["string", "integer", "number", "boolean", "enum", "array", "object", "anyOf", "null"]
    weights = [6, 4, 2, 2, 2, 2, 3 if depth < 2 else 0, 1, 1]
    kind = rng.choices(kinds, weights)[0] if depth else "object"
    if kind == "string":
        s: dict[str, Any] = {"type": "string"}
        r = rng.random()
        if r < 0.2:
            s["pattern"] = rng.choice(PATTERNS)
        elif r < 0.35:
            s["format"] = rng.choice(FORMATS)
        elif r < 0.85:
            s["maxLength"] = rng.randint(1, 30)
            if rng.random() < 0.3:
                s["minLength"] = rng.randint(0, s["maxLength"])
        return s  # else: any string
    if kind in ("integer", "number"):
        s = {"type": kind}
        if rng.random() < 0.7:
            lo = rng.randint(-100, 100)
            s["minimum"], s["maximum"] = lo, lo + rng.randint(0, 1000)
        return s
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "enum":
        pool = ["red", "green", "blue", 1, 2, 3.5, True, None, "n/a"]
        return {"enum": rng.sample(pool, rng.randint(1, 4))}
    if kind == "array":
        lo = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1),
                "minItems": lo, "maxItems": lo + rng.randint(0, 3)}  # fmt: skip
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1) for _ in range(2)]}
    names = rng.sample(WORDS, rng.randint(1, 5))
    props = {n: random_schema(rng, depth + 1) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="write every schema, document and verdict here")
    args = p.parse_args()

    import jsonschema
    import torch

    from thrifty import LLM, SamplingParams
    from thrifty.engine.structured import Constraint

    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    schemas = [random_schema(rng) for _ in range(args.count)]
    llm = LLM(args.model, progress=False)
    engine = llm.engine
    start = time.perf_counter()
    rids = []
    for i, schema in enumerate(schemas):
        ask = f"Write a JSON document for this schema:\n{json.dumps(schema)}"
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=0.7, seed=args.seed * 1000 + i,
            constraint=Constraint("json_schema", json.dumps(schema)),
        )  # fmt: skip
        rids.append(engine.add_request(llm._chat_ids([{"role": "user", "content": ask}]), params))
    while engine.has_unfinished():
        engine.step()
    elapsed = time.perf_counter() - start
    results, tokens = [], 0
    for schema, rid in zip(schemas, rids, strict=True):
        seq = engine.pop_finished(rid).seqs[0]
        tokens += seq.num_output_tokens
        verdict = "valid"
        try:
            jsonschema.validate(json.loads(seq.output_text), schema,
                                format_checker=jsonschema.FormatChecker())  # fmt: skip
        except (json.JSONDecodeError, jsonschema.ValidationError) as e:
            verdict = f"{seq.finish_reason}: {str(e).splitlines()[0]}"
        results.append({"schema": schema, "document": seq.output_text, "verdict": verdict})
    valid = sum(r["verdict"] == "valid" for r in results)
    print(f"{args.model}: {valid}/{len(results)} valid documents, {tokens} tokens in"
          f" {elapsed:.0f} s ({tokens / elapsed:.1f} tokens/s), seed {args.seed}")  # fmt: skip
    for r in results:
        if r["verdict"] != "valid":
            print(f"  {r['verdict']}\n    schema {json.dumps(r['schema'])}")
            print(f"    document {r['document']}")
    if args.out:
        args.out.write_text(json.dumps({"valid": valid, "count": len(results),
                                        "results": results}, indent=1) + "\n")  # fmt: skip
    raise SystemExit(0 if valid == len(results) else 1)


if __name__ == "__main__":
    main()
