"""Why FP8 SmolLM2-135M answers in French loops: the kernels, or the format on this model?

SmolLM2-135M here comes from a Q4_1 GGUF. This script (1) holds every FP8 linear of thrifty's
quantize-on-load model to the pure-torch reference (thrifty.quant.fp8.reference_linear) on the
model's own weights; (2) applies the same FP8 rounding (quantize -> dequantize, float32) to the
torch reference (transformers, float32, from the same GGUF) and reads its greedy answer and its
logits against the unrounded model, rounding all linears or one group at a time. If the
reference, rounded the same way, answers like thrifty's FP8 engine, the kernels are not the cause.

    .venv/bin/python benchmarks/fp8_smollm2.py   (writes benchmarks/results/fp8_smollm2.md)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from thrifty import LLM, SamplingParams, hub
from thrifty.kernels import fp8 as fp8_kernels
from thrifty.models.layers import Linear
from thrifty.quant import fp8

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GROUPS = {
    "none (float32 reference)": (),
    "all linears": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "attention (q, k, v, o)": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "MLP (gate, up, down)": ("gate_proj", "up_proj", "down_proj"),
    "v and o only": ("v_proj", "o_proj"),
    "down only": ("down_proj",),
}


def checkpoint_layout(weight: torch.Tensor) -> torch.Tensor:
    """An FP8 weight as the checkpoint lays it out (the loader packs them for the CPU kernel)."""
    return fp8_kernels.unpack(weight) if weight.dim() == 3 else weight


def kernel_vs_reference(llm: LLM) -> tuple[int, float]:
    """Every FP8 linear, the fast kernel against the reference, on 1 and 8 random rows:
    (linears checked, worst max |difference| / max |reference|)."""
    worst, count = 0.0, 0
    torch.manual_seed(0)
    for module in llm.engine.runner.model.modules():
        if isinstance(module, Linear) and module.weight.dtype == torch.float8_e4m3fn:
            w = checkpoint_layout(module.weight)
            for rows in (1, 8):
                x = torch.randn(rows, w.shape[1]).to(torch.bfloat16)
                fast = fp8_kernels.linear(x, module.weight, module.weight_scale_inv, module.bias)
                ref = fp8.reference_linear(x, w, module.weight_scale_inv, module.bias)
                err = (fast.float() - ref.float()).abs().max() / ref.float().abs().max()
                worst = max(worst, err.item())
            count += 1
    return count, worst


def rounded(model: torch.nn.Module, names: tuple[str, ...], scale_fmt: str) -> dict:
    """Round the weights of the linears named `names` to FP8 in place; returns the originals."""
    saved = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in names:
            saved[name] = module.weight.data.clone()
            q, s = fp8.quantize(module.weight.data, scale_fmt)
            module.weight.data = fp8.dequantize(q, s)
    return saved


def main() -> None:
    from transformers import AutoModelForCausalLM

    load = os.getloadavg()[0]
    gguf = hub.pull("smollm2-135m-instruct")
    lines = [f"FP8 on SmolLM2-135M-Instruct (Q4_1 GGUF); load average {load:.1f} at start", ""]

    fp8_llm = LLM(quantization="fp8", progress=False)
    count, worst = kernel_vs_reference(fp8_llm)
    lines += [f"Kernel against reference_linear: {count} FP8 linears, worst max |diff| / max |ref|"
              f" = {worst:.2e} (bf16 output rounding is ~4e-3)", ""]  # fmt: skip
    greedy = SamplingParams(temperature=0, max_tokens=40)
    ids = fp8_llm._chat_ids(QUESTION)
    answers = {
        "thrifty bf16": LLM(progress=False).generate(ids, greedy)[0].outputs[0].text,
        "thrifty FP8 (fast kernels)": fp8_llm.generate(ids, greedy)[0].outputs[0].text,
    }
    real = fp8_kernels.linear
    fp8_kernels.linear = lambda x, w, s, b=None: fp8.reference_linear(x, checkpoint_layout(w), s, b)
    try:
        answers["thrifty FP8 (reference_linear)"] = fp8_llm.generate(ids, greedy)[0].outputs[0].text
    finally:
        fp8_kernels.linear = real
    tokenizer = fp8_llm.tokenizer
    del fp8_llm

    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                              dtype=torch.float32).eval()  # fmt: skip
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(prompt, do_sample=False, max_new_tokens=40)
        base = hf(out).logits[0, len(ids) - 1 : -1].float()  # the fp32 model's own answer
    first = base[0].softmax(-1).topk(5)  # the first answer token's distribution, float32
    odds = ", ".join(
        f"{tokenizer.decode([int(i)])!r} {float(v):.1%}" for v, i in zip(*first, strict=True)
    )
    lines += [f"First answer token in float32: {odds}", ""]
    lines += ["| weights rounded to FP8 (torch reference, float32) | scales | KL(fp32 ‖ rounded),"
              " mean over the fp32 answer | top-1 agreement | greedy answer |",
              "|---|---|---|---|---|"]  # fmt: skip
    for label, names in GROUPS.items():
        for scale_fmt in ("ue8m0", "float") if names else ("-",):
            saved = rounded(hf, names, scale_fmt) if names else {}
            with torch.no_grad():
                logits = hf(out).logits[0, len(ids) - 1 : -1].float()
                text_ids = hf.generate(prompt, do_sample=False, max_new_tokens=40)[0, len(ids) :]
            for name, module in hf.named_modules():
                if name in saved:
                    module.weight.data = saved[name]
            kl = F.kl_div(logits.log_softmax(-1), base.log_softmax(-1), log_target=True,
                          reduction="batchmean").item()  # fmt: skip
            agree = (logits.argmax(-1) == base.argmax(-1)).float().mean().item()
            text = tokenizer.decode(text_ids.tolist()).replace("\n", " ").replace("|", "/")
            lines.append(f"| {label} | {scale_fmt} | {kl:.4f} | {agree:.0%} | {text[:90]} |")
            print(lines[-1], flush=True)
    lines += ["", "| thrifty engine | greedy answer |", "|---|---|"]
    lines += [f"| {k} | {v.replace(chr(10), ' ')[:110]} |" for k, v in answers.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(__file__).parent.joinpath("results", "fp8_smollm2.md").write_text(text)


if __name__ == "__main__":
    main()
