"""The engine side of benchmarks/throughput.py: one engine and weight type per process.

    python benchmarks/throughput_engines.py SPEC.json

SPEC names the engine, the dtype, the prompts (token ids) and where to write the result. `mode`
"load" times repeated loads; "run" loads once and times prefill and decode, then reports the peak
RSS of this process. Only the standard library is imported at module level: the llama.cpp side
runs in an interpreter that has neither torch nor thrifty.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
THREADS = 2
ATTN_IMPLEMENTATION = "sdpa"  # transformers' default for Llama; its cache is the DynamicCache
PAD_ID = 2  # SmolLM2's pad token (= EOS); equal-length prompts need no padding
LLAMA_CPP_N_CTX = 2048


# One generated token: (seconds since the run started, sequence index, token id).
Event = tuple[float, int, int]


class ThriftyRunner:
    def __init__(self, spec: dict):
        import torch

        torch.set_num_threads(THREADS)
        self.dtype = spec["dtype"]

    def load(self) -> None:
        from thrifty import LLM

        self.llm = LLM(MODEL, dtype=self.dtype, num_threads=THREADS, progress=False)

    def unload(self) -> None:
        del self.llm

    def run(self, prompts: list[list[int]], max_tokens: int) -> list[Event]:
        from thrifty import SamplingParams

        engine = self.llm.engine
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        index = {engine.add_request(p, params): i for i, p in enumerate(prompts)}
        events: list[Event] = []
        while engine.has_unfinished():
            outputs = engine.step()
            t = time.perf_counter() - t0
            events += [(t, index[o.request_id], tok) for o in outputs for tok in o.token_ids]
        for rid in index:
            engine.pop_finished(rid)
        return events


class TransformersRunner:
    def __init__(self, spec: dict):
        import torch

        torch.set_num_threads(THREADS)
        self.torch = torch
        self.dtype = getattr(torch, spec["dtype"])
        self.gguf = Path(spec["gguf"])

    def load(self) -> None:
        from transformers import AutoModelForCausalLM

        # thrifty's converted directory holds no weights (they stay in the GGUF): transformers
        # dequantizes the same file into its dtype.
        model = AutoModelForCausalLM.from_pretrained(
            self.gguf.parent,
            gguf_file=self.gguf.name,
            dtype=self.dtype,
            attn_implementation=ATTN_IMPLEMENTATION,
        )
        model.generation_config.eos_token_id = None  # ignore EOS: always max_new_tokens
        self.model = model.eval()

    def unload(self) -> None:
        del self.model

    def run(self, prompts: list[list[int]], max_tokens: int) -> list[Event]:
        from transformers.generation.streamers import BaseStreamer

        torch = self.torch
        width = max(len(p) for p in prompts)  # left padding
        ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        events: list[Event] = []
        t0 = time.perf_counter()

        class Clock(BaseStreamer):
            # generate() puts the prompt first, then each step's new tokens, (B,) at a time.
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                t = time.perf_counter() - t0
                events.extend((t, i, int(tok)) for i, tok in enumerate(value.reshape(-1)))

            def end(self):
                pass

        with torch.inference_mode():
            self.model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=PAD_ID,
                streamer=Clock(),
            )
        return events


class LlamaCppRunner:
    def __init__(self, spec: dict):
        self.path = spec["gguf"]

    def load(self) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=self.path,
            n_ctx=LLAMA_CPP_N_CTX,
            n_threads=THREADS,
            n_threads_batch=THREADS,
            verbose=False,
        )

    def unload(self) -> None:
        self.llm.close()
        del self.llm

    def run(self, prompts: list[list[int]], max_tokens: int) -> list[Event]:
        # The high-level Llama object holds one sequence: no batched generation.
        assert len(prompts) == 1, "llama-cpp-python's high-level API generates one sequence"
        self.llm.reset()
        events: list[Event] = []
        t0 = time.perf_counter()
        for tok in self.llm.generate(prompts[0], temp=0.0, repeat_penalty=1.0, reset=True):
            events.append((time.perf_counter() - t0, 0, tok))
            if len(events) == max_tokens:
                break
        return events


RUNNERS = {
    "thrifty": ThriftyRunner,
    "transformers": TransformersRunner,
    "llama.cpp": LlamaCppRunner,
}


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def decode_metrics(events: list[Event], num_seqs: int, max_tokens: int) -> dict:
    """Decode tokens/s counted from the moment every sequence has its first token."""
    first: dict[int, float] = {}
    for t, i, _ in events:
        first.setdefault(i, t)
    counts = [sum(1 for _, i, _ in events if i == s) for s in range(num_seqs)]
    if counts != [max_tokens] * num_seqs:
        raise RuntimeError(f"expected {max_tokens} tokens per sequence, got {counts}")
    t_all_first = max(first.values())
    t_end = max(t for t, _, _ in events)
    decoded = sum(1 for t, _, _ in events if t > t_all_first)
    return {
        "ttft_s": t_all_first,
        "decode_s": t_end - t_all_first,
        "decode_tokens": decoded,
        "tokens_per_s": decoded / (t_end - t_all_first),
    }


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    runner = RUNNERS[spec["engine"]](spec)
    measure = measure_load if spec["mode"] == "load" else measure_throughput
    Path(spec["result_path"]).write_text(json.dumps(measure(runner, spec)))


def measure_load(runner, spec: dict) -> dict:
    """Load times, in a process of their own: reloading fragments the heap and would inflate
    the memory peak of the throughput process."""
    t = time.perf_counter()
    runner.load()  # the first load pays for lazy imports and a cold page cache
    out = {"first_load_s": time.perf_counter() - t, "load_s": []}
    for _ in range(spec["plan"]["reps"]):
        runner.unload()
        gc.collect()
        t = time.perf_counter()
        runner.load()
        out["load_s"].append(time.perf_counter() - t)
    return out


def measure_throughput(runner, spec: dict) -> dict:
    prompts, max_tokens = spec["prompts"], spec["plan"]["max_tokens"]
    runner.load()
    out: dict = {"max_rss_after_load_mib": max_rss_mib()}
    runner.run(prompts["warmup"][: max(spec["batch_sizes"])], 8)
    out["prefill_tokens_per_s"] = []
    for prompt in prompts["prefill"]:
        events = runner.run([prompt], 1)
        out["prefill_tokens_per_s"].append(len(prompt) / events[0][0])
    out["decode"] = {}
    for b in spec["batch_sizes"]:
        out["decode"][str(b)] = []
        for batch in prompts["decode"][str(b)]:
            events = runner.run(batch, max_tokens)
            out["decode"][str(b)].append(decode_metrics(events, b, max_tokens))
            if "greedy_sample" not in out:  # to check that the engines agree
                out["greedy_sample"] = [tok for _, i, tok in events if i == 0][:32]
    out["max_rss_mib"] = max_rss_mib()
    return out


if __name__ == "__main__":
    main(sys.argv[1])
