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


# One generated token: (seconds since the run started, sequence index, token id).
Event = tuple[float, int, int]


class ThriftyRunner:
    def __init__(self, spec: dict):
        import torch

        torch.set_num_threads(THREADS)
        self.dtype = spec["dtype"]
        self.kv_cache_dtype = spec.get("kv_cache_dtype", "auto")

    def load(self) -> None:
        from thrifty import LLM

        self.llm = LLM(
            MODEL,
            dtype=self.dtype,
            kv_cache_dtype=self.kv_cache_dtype,
            num_threads=THREADS,
            progress=False,
        )

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
    """llama.cpp through llama-cpp-python's low-level API, so that it decodes batches too.

    The high-level `Llama` object holds one sequence; here one `llama_decode` call runs a step
    for every sequence of the batch (each its own `seq_id`, as llama.cpp's batched example and
    its server do), prompts go in `n_batch`-token chunks, and greedy picks the argmax of each
    sequence's logits. The KV cache is one stream per sequence (`kv_unified` off, llama.cpp's
    advice for sequences that share no prefix), each `n_ctx / n_seq_max` cells long.
    """

    N_BATCH = 512

    def __init__(self, spec: dict):
        self.path = spec["gguf"]
        self.n_seq = max(spec["batch_sizes"])
        plan = spec["plan"]
        self.n_ctx_seq = max(
            plan["prefill_len"] + 1, plan["decode_prompt_len"] + plan["max_tokens"]
        )

    def load(self) -> None:
        import llama_cpp
        from llama_cpp import Llama

        self.lib = llama_cpp
        self.llm = Llama(model_path=self.path, n_ctx=16, n_threads=THREADS, verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_seq * ((self.n_ctx_seq + 255) // 256 * 256)
        params.n_batch = params.n_ubatch = self.N_BATCH
        params.n_seq_max = self.n_seq
        params.n_threads = params.n_threads_batch = THREADS
        params.kv_unified = False
        self.ctx = llama_cpp.llama_init_from_model(self.llm._model.model, params)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.batch = llama_cpp.llama_batch_init(self.N_BATCH, 0, 1)
        vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    def unload(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.llm.close()
        del self.llm

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """One llama_decode over (token, pos, seq, wants_logits); the greedy token of each
        item that wants logits."""
        import numpy as np

        b = self.batch
        for k, (tok, pos, seq, out) in enumerate(items):
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = tok, pos, 1, out
            b.seq_id[k][0] = seq
        b.n_tokens = len(items)
        if rc := self.lib.llama_decode(self.ctx, b):
            raise RuntimeError(f"llama_decode returned {rc}")
        picks = []
        for k, (_, _, _, out) in enumerate(items):
            if out:
                row = self.lib.llama_get_logits_ith(self.ctx, k)
                picks.append(int(np.ctypeslib.as_array(row, shape=(self.n_vocab,)).argmax()))
        return picks

    def run(self, prompts: list[list[int]], max_tokens: int) -> list[Event]:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        events: list[Event] = []
        t0 = time.perf_counter()
        # Prompts: every token of every sequence, in chunks; logits at each prompt's last token.
        items = [
            (tok, pos, seq, pos == len(p) - 1)
            for seq, p in enumerate(prompts)
            for pos, tok in enumerate(p)
        ]
        last: list[int] = []
        for i in range(0, len(items), self.N_BATCH):
            last += self._decode(items[i : i + self.N_BATCH])
        t = time.perf_counter() - t0
        events += [(t, seq, tok) for seq, tok in enumerate(last)]
        for step in range(1, max_tokens):
            items = [
                (tok, len(p) + step - 1, seq, True)
                for seq, (p, tok) in enumerate(zip(prompts, last, strict=True))
            ]
            last = self._decode(items)
            t = time.perf_counter() - t0
            events += [(t, seq, tok) for seq, tok in enumerate(last)]
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
