"""Where a decode step's time goes: the GGUF linears by shape, attention, the small ops, the rest.

One process, one model, `--batch` sequences of 64-token prompts decoding `--steps` greedy tokens
(EOS ignored). Each compiled op the step calls is wrapped in a timer, each Linear's bound kernel
too (timed by its output width: 960 = qkv, 576 = o_proj and down_proj, 3072 = gate_up, the
vocabulary = the head); what is left of the step is Python, the scheduler, the embedding and
the step's tensors (the timers themselves add about a microsecond a call).

    .venv/bin/python benchmarks/decode_step.py [--model NAME] [--batch 1] [--steps 200]
"""

from __future__ import annotations

import argparse
import collections
import functools
import time
import types

import torch

from thrifty import LLM, SamplingParams, kernels
from thrifty.models.layers import Linear

OPS = ("paged_decode_attention", "rope_store_kv", "add_rms_norm", "rms_norm", "silu_and_mul",
       "sample_rows", "argmax")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    llm = LLM(args.model, num_threads=args.threads, progress=False)
    engine, model = llm.engine, llm.engine.runner.model
    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()

    def timed(fn, label: str):
        @functools.wraps(fn)
        def run(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            seconds[label] += time.perf_counter() - t
            calls[label] += 1
            return out

        return run

    for name in OPS:
        setattr(kernels, name, timed(getattr(kernels, name), name))
    # The bound decoder layers (llama.run_compiled) call the compiled module's functions directly.
    ext = kernels.cpu_ops()
    ops = types.SimpleNamespace(
        **{n: timed(f, n) if n in OPS else f for n, f in vars(ext).items() if callable(f)}
    )
    kernels.cpu_ops = lambda: ops
    for module in model.modules():
        if isinstance(module, Linear):
            width = module.weight.shape[0]
            module.__dict__["_kernel"] = timed(module.bound_kernel(), f"linear, {width} outputs")

    params = SamplingParams(max_tokens=args.steps + 1, temperature=0, ignore_eos=True)
    for s in range(args.batch):
        engine.add_request([1] + [(t * 31 + s * 977) % 49000 + 100 for t in range(63)], params)
    engine.step()  # the prompts
    seconds.clear()
    calls.clear()
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    step_ms = (time.perf_counter() - start) / steps * 1e3
    print(f"{args.model}, batch {args.batch}, {steps} steps, {torch.get_num_threads()} threads:")
    print(f"{step_ms:.2f} ms a step, {args.batch * 1e3 / step_ms:.1f} tok/s\n")
    print("| part | ms a step | us a call | share |\n|---|---|---|---|")
    for label, total in sorted(seconds.items(), key=lambda kv: -kv[1]):
        ms = total / steps * 1e3
        print(f"| {label} | {ms:.2f} | {total / calls[label] * 1e6:.1f} | {ms / step_ms:.0%} |")
    rest = step_ms - sum(seconds.values()) / steps * 1e3
    print(f"| the rest (Python, scheduler, embedding, step tensors) | {rest:.2f} | | "
          f"{rest / step_ms:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
