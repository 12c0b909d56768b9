"""Greedy tokens of a model under `tensor_parallel_size` ranks, as JSON on stdout.

Run as a script by tests/test_tensor_parallel.py, so that the process group and the ranks it
spawns live and die with this process, not with the test session:
    python tests/tp_generate.py MODEL_DIR RANKS PROMPTS_JSON
"""

from __future__ import annotations

import json
import sys

from thrifty import LLM, SamplingParams


def generate(
    path: str, ranks: int, prompts: list[list[int]], num_threads: int | None = None
) -> list[list[int]]:
    llm = LLM(
        path,
        dtype="float32",
        tensor_parallel_size=ranks,
        num_threads=num_threads,
        num_kv_blocks=64,
        block_size=4,
        progress=False,
    )
    # Different lengths: the batch decodes three sequences, then two, then one (which leaves
    # rank 1 no token of its own to route under expert parallelism).
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (4, 7, 10)]
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]


if __name__ == "__main__":
    path, ranks, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    print(json.dumps(generate(path, ranks, prompts, num_threads=1)))  # 2 ranks on 2 cores
