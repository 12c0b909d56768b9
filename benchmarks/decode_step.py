"""Where a decode step's time goes: the GGUF linears by shape, attention, the small ops, the rest.

One process, one model, `--batch` sequences of 64-token prompts decoding `--steps` greedy tokens
(EOS ignored), in blocks of 25 steps that take turns between the two loops over the layers:
C++ (csrc/decode_layers.h: embedding, layers and final norm in one call, what a decode step
runs) and Python (llama.run_compiled's own loop over the same ops, which lets each op be timed
from here). Each compiled op the Python loop calls is wrapped in a timer, each Linear's bound
kernel too (timed by its output width: 960 = qkv, 576 = o_proj and down_proj, 3072 = gate_up,
the vocabulary = the head), and the model body as a whole; what is left of the step is Python,
the scheduler, the sampler's own Python and the step's tensors (the timers themselves add about
a microsecond a call).

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
from thrifty.models import llama
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

    layers_label = "model body (embedding, layers, final norm: all in it)"
    model.forward = timed(model.forward, layers_label)
    params = SamplingParams(max_tokens=2 * args.steps + 1, temperature=0, ignore_eos=True)
    for s in range(args.batch):
        engine.add_request([1] + [(t * 31 + s * 977) % 49000 + 100 for t in range(63)], params)
    engine.step()  # the prompts
    loops = {True: "C++ loop", False: "Python loop"}
    split = {native: collections.Counter() for native in loops}  # seconds by label
    counted = {native: collections.Counter() for native in loops}  # calls by label
    elapsed, steps = dict.fromkeys(loops, 0.0), dict.fromkeys(loops, 0)
    while engine.has_unfinished():
        native = steps[True] <= steps[False]
        llama.NATIVE_DECODE = native
        seconds.clear()
        calls.clear()
        start = time.perf_counter()
        for _ in range(25):
            if engine.has_unfinished():
                engine.step()
                steps[native] += 1
        elapsed[native] += time.perf_counter() - start
        split[native].update(seconds)
        counted[native].update(calls)
    ms = {n: elapsed[n] / steps[n] * 1e3 for n in loops}
    print(f"{args.model}, batch {args.batch}, {steps[True]} + {steps[False]} steps, "
          f"{torch.get_num_threads()} threads: the C++ layer loop {ms[True]:.2f} ms a step "
          f"({args.batch * 1e3 / ms[True]:.1f} tok/s), the Python loop {ms[False]:.2f} ms "
          f"({args.batch * 1e3 / ms[False]:.1f} tok/s)\n")  # fmt: skip
    print("| part | C++ loop, ms a step | Python loop, ms a step | Python loop, us a call |")
    print("|---|---|---|---|")
    python = split[False]
    for label, total in python.most_common():
        cxx = split[True][label]
        cxx_ms = f"{cxx / steps[True] * 1e3:.2f}" if cxx else "(in the C++ loop)"
        print(f"| {label} | {cxx_ms} | {total / steps[False] * 1e3:.2f} | "
              f"{total / counted[False][label] * 1e6:.1f} |")  # fmt: skip
    head = f"linear, {model.lm_head.weight.shape[0]} outputs"
    outside = (layers_label, head, "argmax", "sample_rows")  # timed outside the layer loop
    in_loop = sum(v for k, v in python.items() if k not in outside)
    loop = (python[layers_label] - in_loop) / steps[False] * 1e3
    rest = {n: ms[n] - sum(split[n][k] for k in outside) / steps[n] * 1e3 for n in loops}
    print(f"| the Python loop itself (the body less the ops timed in it) | | {loop:.2f} | |")
    print(f"| the rest (Python, scheduler, step tensors) | {rest[True]:.2f} | "
          f"{rest[False]:.2f} | |")  # fmt: skip


if __name__ == "__main__":
    main()
