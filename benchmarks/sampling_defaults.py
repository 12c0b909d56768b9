"""Which sampling defaults suit a tiny model: answer accuracy and repeated sentences by setting.

For each setting, 10 seeded samples of three factual questions (does the answer name the right
word within 40 tokens?) and 6 of a short story (does any sentence repeat within 300 tokens?),
plus the greedy story. thrifty's defaults (thrifty/generation_defaults.py) follow this table.

    .venv/bin/python benchmarks/sampling_defaults.py [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from thrifty import LLM, SamplingParams

QUESTIONS = {
    "What is the capital of France?": "Paris",
    "What is 2+2?": "4",
    "Which planet is the largest in our solar system?": "Jupiter",
}
STORY = [{"role": "user", "content": "Tell me a short story about a robot."}]
# (temperature, top_p, repetition_penalty)
SETTINGS = [(0.0, 1.0, 1.0), (0.0, 1.0, 1.1), (0.7, 0.9, 1.0), (0.7, 0.9, 1.05), (0.7, 0.9, 1.1),
            (1.0, 1.0, 1.0)]  # fmt: skip


def repeats(text: str) -> bool:
    sentences = [s.strip() for s in re.split(r"[.!?\n]", text) if len(s.strip()) > 10]
    return any(sentences.count(s) > 1 for s in sentences)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampling_defaults"))
    args = p.parse_args()
    llm = LLM(args.model, progress=False)
    rows = [
        f"Sampling defaults on {args.model} (seed 1; load average"
        f" {os.getloadavg()[0]:.1f} at start)",
        "",
        "| temperature | top_p | repetition_penalty | right answers (of 30) | stories repeating"
        " a sentence | greedy story repeats |",
        "|---|---|---|---|---|---|",
    ]
    for t, top_p, rp in SETTINGS:
        n = 1 if t == 0 else 10
        right = 0
        for question, want in QUESTIONS.items():
            params = SamplingParams(n=n, temperature=t, top_p=top_p, repetition_penalty=rp,
                                    seed=1, max_tokens=40)  # fmt: skip
            outs = llm.chat([{"role": "user", "content": question}], params)[0].outputs
            right += sum(want in o.text for o in outs) * (10 // n)
        params = SamplingParams(n=6 if t else 1, temperature=t, top_p=top_p,
                                repetition_penalty=rp, seed=1, max_tokens=300)  # fmt: skip
        stories = llm.chat(STORY, params)[0].outputs
        looped = f"{sum(repeats(o.text) for o in stories)}/{len(stories)}" if t else "-"
        greedy = SamplingParams(temperature=0, repetition_penalty=rp, max_tokens=300)
        g = repeats(llm.chat(STORY, greedy)[0].outputs[0].text)
        rows.append(f"| {t:g} | {top_p:g} | {rp:g} | {right} | {looped} | {'yes' if g else 'no'} |")
        print(rows[-1], flush=True)
        Path(args.out).with_suffix(".md").write_text("\n".join(rows) + "\n")  # row by row


if __name__ == "__main__":
    main()
