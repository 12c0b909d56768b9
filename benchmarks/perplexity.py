"""Perplexity of a model on gensim's English Wikipedia sample: bf16 against FP8 weights.

The text is the first articles of the Wikipedia dump sample that gensim ships as test data
(`enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`), with wiki markup
stripped. Get it without installing gensim:

    pip download gensim --no-deps -d /tmp/gensim
    unzip -o /tmp/gensim/gensim-*.whl 'gensim/test/test_data/enwiki-*-shortened.bz2' -d /tmp/gensim

Each model is scored in non-overlapping windows of `--window` tokens (the first token of each
window is context only), all on the same token ids, in three variants: the bf16 weights, FP8
with float scales and FP8 with UE8M0 scales, the two FP8 checkpoints written by
`thrifty quantize` into a temporary directory.

    python benchmarks/perplexity.py --wiki /tmp/gensim/gensim/test/test_data/enwiki-...bz2 \\
        --models smollm2-135m-instruct qwen2.5-coder-0.5b-instruct --json results/perplexity.json
"""

from __future__ import annotations

import argparse
import bz2
import json
import math
import re
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from thrifty import hub
from thrifty.config import EngineConfig, ModelConfig
from thrifty.engine.model_runner import ModelRunner
from thrifty.loader.weights import load_model
from thrifty.models.attention import build_metadata, forward_context
from thrifty.quant.checkpoint import quantize_checkpoint
from thrifty.tokenizer import Tokenizer

BLOCK = 16


def wiki_text(path: Path, max_chars: int) -> str:
    """Plain text of the dump's articles, in order, until `max_chars`."""
    ns = "{http://www.mediawiki.org/xml/export-0.10/}"
    parts: list[str] = []
    total = 0
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for _, el in ET.iterparse(f):
            if el.tag != ns + "page":
                continue
            text = el.findtext(f"{ns}revision/{ns}text") or ""
            el.clear()
            if text.lstrip().lower().startswith("#redirect"):
                continue
            clean = strip_markup(text)
            if len(clean) < 500:
                continue
            parts.append(clean)
            total += len(clean)
            if total >= max_chars:
                break
    return "\n\n".join(parts)[:max_chars]


def strip_markup(text: str) -> str:
    for _ in range(3):  # nested templates, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
    text = re.sub(r"\{\|.*?\|\}", "", text, flags=re.S)  # tables
    text = re.sub(r"<ref[^>]*/>|<ref.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<!--.*?-->|<[^>]+>", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)
    text = re.sub(r"&[a-z]+;", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


@torch.inference_mode()
def perplexity(
    path: Path, ids: torch.Tensor, window: int, dtype: torch.dtype, quantization: str | None = None
) -> float:
    cfg = ModelConfig.from_dir(path)
    model = load_model(path, cfg, dtype=dtype, quantization=quantization)
    blocks = window // BLOCK + 1
    ModelRunner(model, cfg, EngineConfig(dtype=dtype, block_size=BLOCK, num_kv_blocks=blocks + 1))
    nll, count = 0.0, 0
    for start in range(0, len(ids) - window + 1, window):
        chunk = ids[start : start + window]
        meta = build_metadata([window], [window], [list(range(1, blocks + 1))], BLOCK)
        with forward_context(meta):
            logits = model.compute_logits(model(chunk, torch.arange(window)))
        nll += torch.nn.functional.cross_entropy(logits[:-1], chunk[1:], reduction="sum").item()
        count += window - 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wiki", type=Path, required=True, help="gensim's enwiki *-shortened.bz2")
    ap.add_argument(
        "--models", nargs="+", default=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]
    )
    ap.add_argument("--tokens", type=int, default=4096, help="tokens scored per model")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    text = wiki_text(args.wiki, max_chars=args.tokens * 8)
    rows = []
    for name in args.models:
        src = hub.resolve(name, progress=False)
        ids = torch.tensor(Tokenizer.from_dir(src, ()).encode(text, add_special_tokens=False))
        ids = ids[: args.tokens]
        with tempfile.TemporaryDirectory() as tmp:
            variants = {"bf16": (src, None)}
            for fmt in ("float", "ue8m0"):
                path = quantize_checkpoint(src, Path(tmp) / fmt, fmt, progress=False)
                variants[f"fp8-{fmt}"] = (path, None)
            variants["fp8-all"] = (src, "fp8-all")  # UE8M0 on load, an untied head too
            row = {"model": name, "tokens": len(ids), "window": args.window}
            for variant, (path, quantization) in variants.items():
                t = time.perf_counter()
                row[variant] = perplexity(path, ids, args.window, torch.bfloat16, quantization)
                print(f"{name} {variant}: {row[variant]:.3f} ({time.perf_counter() - t:.0f} s)")
        for fmt in ("float", "ue8m0", "all"):
            row[f"fp8-{fmt}_vs_bf16_pct"] = 100 * (row[f"fp8-{fmt}"] / row["bf16"] - 1)
        rows.append(row)
    print()
    print(
        "| model | tokens | bf16 | FP8 (float scales) | FP8 (UE8M0 scales) "
        "| FP8-all (UE8M0, head too) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['tokens']} | {r['bf16']:.3f} | "
            f"{r['fp8-float']:.3f} ({r['fp8-float_vs_bf16_pct']:+.2f}%) | "
            f"{r['fp8-ue8m0']:.3f} ({r['fp8-ue8m0_vs_bf16_pct']:+.2f}%) | "
            f"{r['fp8-all']:.3f} ({r['fp8-all_vs_bf16_pct']:+.2f}%) |"
        )
    if args.json:
        meta = {
            "text": args.wiki.name,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
