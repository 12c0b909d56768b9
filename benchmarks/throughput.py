"""Throughput on CPU: thrifty, transformers and llama.cpp side by side on SmolLM2-135M-Instruct.

For each engine and weight type it measures prefill tokens/s (one long prompt), decode tokens/s at
batch 1 and the aggregate at larger batches (greedy, EOS ignored, timed after every sequence has
its first token), the model load time (from the conversion cache, after one untimed load) and the
peak resident memory. Each engine runs in its own subprocess so its memory peak is its own; the
llama.cpp part runs in a separate interpreter given by --llama-cpp-python.

All engines get the same token ids: consecutive windows of Python's bundled documentation
(`pydoc_data.topics`), each after the BOS token, so no prompt shares a prefix with another.

    .venv/bin/python benchmarks/throughput.py --llama-cpp-python /tmp/llamacpp/venv/bin/python
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from throughput_engines import ATTN_IMPLEMENTATION, MODEL, THREADS

BOS_ID = 1
RESULTS = Path(__file__).resolve().parent / "results"
ENGINES = ("thrifty", "transformers", "llama.cpp")
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp32-kvbf16": "float32"}
# thrifty only: float32 activations over a bfloat16 KV cache (--kv-cache-dtype bfloat16)
KV_CACHE = {"fp32-kvbf16": "bfloat16"}


@dataclass(frozen=True)
class Plan:
    prefill_len: int  # tokens in the prefill prompt, BOS included
    decode_prompt_len: int  # tokens in each decode prompt, BOS included
    max_tokens: int  # tokens generated per sequence in the decode runs
    batch_sizes: tuple[int, ...]
    reps: int


FULL = Plan(prefill_len=512, decode_prompt_len=64, max_tokens=128, batch_sizes=(1, 8, 32), reps=3)
QUICK = Plan(prefill_len=128, decode_prompt_len=32, max_tokens=16, batch_sizes=(1, 8, 32), reps=1)


# ---------------------------------------------------------------------------------------------
# Parent side: prompts, subprocesses, the report.


def make_prompts(hf_dir: Path, plan: Plan, batch_sizes: list[int]) -> dict:
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(text).ids
    pos = 0

    def take(n: int) -> list[int]:
        nonlocal pos
        if pos + n - 1 > len(ids):
            raise RuntimeError("the prompt corpus is too short for this plan")
        pos += n - 1
        return [BOS_ID, *ids[pos - (n - 1) : pos]]

    return {
        "warmup": [take(plan.decode_prompt_len) for _ in range(2)],
        "prefill": [take(plan.prefill_len) for _ in range(plan.reps)],
        "decode": {
            str(b): [[take(plan.decode_prompt_len) for _ in range(b)] for _ in range(plan.reps)]
            for b in batch_sizes
        },
    }


def run_child(python: str, spec: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="thrifty-bench-") as tmp:
        spec = {**spec, "result_path": str(Path(tmp) / "result.json")}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        proc = subprocess.run(
            [python, str(Path(__file__).with_name("throughput_engines.py")), str(spec_path)],
            capture_output=True,
            text=True,
            env=env,
        )
        result_path = Path(spec["result_path"])
        if proc.returncode != 0 or not result_path.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": f"exit status {proc.returncode}: {tail[0]}", "stderr": proc.stderr}
        return json.loads(result_path.read_text())


def llama_cpp_version(python: str | None) -> tuple[str | None, str]:
    """(version, why it is skipped) for the llama.cpp interpreter."""
    if not python:
        return None, "no --llama-cpp-python interpreter given"
    try:
        proc = subprocess.run(
            [python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{python} could not be run: {e}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        return None, f"`import llama_cpp` fails in {python}: {last}"
    return proc.stdout.strip(), ""


class LoadMonitor:
    """Samples the 1-minute load average while the engines run: 2 cores shared with other work
    make every timing suspect, so the report says how busy the machine was."""

    def __init__(self, period_s: float = 5.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(period_s,), daemon=True)

    def _sample(self, period_s: float) -> None:
        while not self._stop.is_set():
            self.samples.append(float(Path("/proc/loadavg").read_text().split()[0]))
            self._stop.wait(period_s)

    def __enter__(self) -> LoadMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def machine() -> dict:
    cpu = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    features = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return {"cpu": cpu, "features": features, "cores": os.cpu_count(), "threads_used": THREADS}


def git_revision() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(result: dict) -> dict:
    if "error" in result:
        return result
    s = {
        "load_s": summary(result["load_s"]),
        "prefill_tokens_per_s": summary(result["prefill_tokens_per_s"]),
        "max_rss_after_load_mib": result["max_rss_after_load_mib"],
        "max_rss_mib": result["max_rss_mib"],
    }
    for b, runs in result["decode"].items():
        s[f"decode_b{b}_tokens_per_s"] = summary([r["tokens_per_s"] for r in runs])
    return s


def cell(stat: dict | None, digits: int = 1) -> str:
    if stat is None:
        return "n/a"
    m, lo, hi = stat["median"], stat["min"], stat["max"]
    if lo == hi:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def render(report: dict) -> str:
    plan, rows = report["plan"], report["rows"]
    batches = plan["batch_sizes"]
    head = ["engine", "weights", f"prefill tok/s ({plan['prefill_len']} tok)"]
    head += [f"decode tok/s b={b}" for b in batches]
    head += ["load s", "peak RSS MiB after load", "peak RSS MiB"]
    lines = [
        f"# Throughput: {report['model']} on CPU",
        "",
        f"{report['date']} · {report['machine']['cpu']}"
        f" ({', '.join(report['machine'].get('features', []))}),"
        f" {report['machine']['cores']} cores,"
        f" {THREADS} threads · torch {report['versions']['torch']} · transformers"
        f" {report['versions']['transformers']} · llama-cpp-python"
        f" {report['versions']['llama_cpp_python'] or 'skipped'} · thrifty {report['revision']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        name = row["engine"] + (
            f" ({ATTN_IMPLEMENTATION})" if row["engine"] == "transformers" else ""
        )
        s = row["summary"]
        if "error" in s:
            lines.append(f"| {name} | {row['weights']} | failed: {s['error']} |")
            continue
        cells = [name, row["weights"], cell(s["prefill_tokens_per_s"], 0)]
        cells += [cell(s.get(f"decode_b{b}_tokens_per_s")) for b in batches]
        cells += [cell(s["load_s"], 2), f"{s['max_rss_after_load_mib']:.0f}"]
        cells += [f"{s['max_rss_mib']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Medians of {plan['reps']} runs, (min–max) in brackets; the engines take turns, one run"
        " of each after another, each run a fresh process. Prefill: one prompt of"
        f" {plan['prefill_len']} tokens, tokens / time to first token. Decode: greedy, EOS ignored,"
        f" {plan['max_tokens']} tokens per sequence after {plan['decode_prompt_len']}-token"
        " prompts, b different prompts submitted together; tokens generated after every"
        " sequence had its first token / that wall time (aggregate over the batch). Load: the"
        " median of the loads after one untimed load, from thrifty's conversion cache, in a"
        " process of its own. Peak RSS: the largest ru_maxrss of the run processes, each loading"
        " the engine once (after load) and running one repetition of every measurement above.",
        "thrifty runs the GGUF's own Q4_1 and Q8_0 weights natively (the dtype shown is its"
        " activations'); transformers dequantizes the same GGUF into the dtype shown and uses"
        f" `generate` with {ATTN_IMPLEMENTATION} attention and its dynamic cache. llama.cpp runs"
        " the Q4_1 GGUF itself (its native format, memory-mapped).",
    ]
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def compare(report: dict) -> list[str]:
    """thrifty's speed against each peer (the ratio of medians per measure), and how many
    leading greedy tokens they share."""
    by = {(r["engine"], r["weights"]): r for r in report["rows"]}
    ok = {k: r for k, r in by.items() if "error" not in r["summary"]}
    notes = []
    for weights in report["dtypes"]:
        th = ok.get(("thrifty", weights))
        if not th:
            continue
        for peer in (("transformers", weights.split("-")[0]), ("llama.cpp", "Q4_1")):
            other = ok.get(peer)
            if not other:
                continue
            ratios = [
                f"{key.removesuffix('_tokens_per_s').replace('_', ' ')}"
                f" {s['median'] / other['summary'][key]['median']:.2f}x"
                for key, s in th["summary"].items()
                if key.endswith("tokens_per_s") and key in other["summary"]
            ]
            a, b = th["raw"]["greedy_sample"], other["raw"]["greedy_sample"]
            same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
            notes.append(
                f"thrifty {weights} / {' '.join(peer)}: {', '.join(ratios)}; greedy tokens:"
                f" first {same} of {len(a)} agree"
            )
    return notes


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dtypes",
        default="bf16,fp32",
        help="comma-separated: bf16, fp32, fp32-kvbf16 (thrifty only: a bfloat16 KV cache)",
    )
    p.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated: " + ", ".join(ENGINES)
    )
    p.add_argument("--llama-cpp-python", metavar="PATH", help="a python interpreter with llama_cpp")
    p.add_argument("--quick", action="store_true", help="a short smoke run (fewer tokens, 1 rep)")
    p.add_argument(
        "--out", default="throughput", help="results/OUT.md and .json (a CPU's own table)"
    )
    args = p.parse_args()
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r} (choose from {', '.join(DTYPES)})")
    for e in args.engines:
        if e not in ENGINES:
            p.error(f"unknown engine {e!r} (choose from {', '.join(ENGINES)})")
    return args


def main() -> None:
    args = parse_args()
    from thrifty import hub

    plan = QUICK if args.quick else FULL
    gguf = hub.pull(MODEL)
    hf_dir = hub.resolve(MODEL)  # converts once; every load below comes from this cache
    prompts = make_prompts(hf_dir, plan, list(plan.batch_sizes))
    notes: list[str] = []
    llama_version, why = llama_cpp_version(args.llama_cpp_python)
    jobs = [
        (e, d)
        for e in ("thrifty", "transformers")
        if e in args.engines
        for d in args.dtypes
        if e == "thrifty" or d not in KV_CACHE
    ]
    if "llama.cpp" in args.engines:
        if llama_version:
            jobs.append(("llama.cpp", "Q4_1"))
            notes.append(
                "llama.cpp: llama-cpp-python's low-level API, one llama_decode per step over the"
                " whole batch (a seq_id per sequence, one KV stream each), prompts in 512-token"
                " chunks, greedy argmax over each sequence's logits."
            )
        else:
            print(f"llama.cpp skipped: {why}", file=sys.stderr)
            notes.append(f"llama.cpp skipped: {why}.")

    if not jobs:
        sys.exit("nothing to run")
    specs = {}
    for engine, dtype in jobs:
        llama = engine == "llama.cpp"
        specs[engine, dtype] = {
            "engine": engine,
            "dtype": DTYPES.get(dtype, dtype),
            "kv_cache_dtype": KV_CACHE.get(dtype, "auto"),
            "plan": dataclasses.asdict(plan),
            "batch_sizes": list(plan.batch_sizes),
            "prompts": prompts,
            "hf_dir": str(hf_dir),
            "gguf": str(gguf),
            "python": args.llama_cpp_python if llama else sys.executable,
        }
    raws: dict[tuple[str, str], dict] = {}
    samples: dict[tuple[str, str], list[float]] = {job: [] for job in jobs}
    walls = dict.fromkeys(jobs, 0.0)

    def child(job: tuple[str, str], spec: dict) -> dict:
        t = time.perf_counter()
        with LoadMonitor() as load:
            out = run_child(spec["python"], spec)
        walls[job] += time.perf_counter() - t
        samples[job] += load.samples
        return out

    for job, spec in specs.items():  # load times first, each engine in its own process
        print(f"loading {' '.join(job)} ...", file=sys.stderr, flush=True)
        raws[job] = child(job, {**spec, "mode": "load"})
    # Then the runs take turns, one repetition of every engine after another, so that the
    # machine's drift falls on all of them alike; each run is a fresh process.
    for rep in range(plan.reps):
        for job, spec in specs.items():
            raw = raws[job]
            if "error" in raw:
                continue
            print(f"run {rep + 1}/{plan.reps}: {' '.join(job)} ...", file=sys.stderr, flush=True)
            one = {
                **prompts,
                "prefill": prompts["prefill"][rep : rep + 1],
                "decode": {b: runs[rep : rep + 1] for b, runs in prompts["decode"].items()},
            }
            out = child(job, {**spec, "mode": "run", "prompts": one})
            if "error" in out:
                raws[job] = out
                continue
            for key in ("max_rss_after_load_mib", "max_rss_mib"):
                raw[key] = max(raw.get(key, 0.0), out[key])
            raw.setdefault("greedy_sample", out["greedy_sample"])
            raw.setdefault("prefill_tokens_per_s", []).extend(out["prefill_tokens_per_s"])
            for b, runs in out["decode"].items():
                raw.setdefault("decode", {}).setdefault(b, []).extend(runs)
    rows = []
    for job in jobs:
        raw = raws[job]
        raw["wall_s"] = walls[job]
        raw["load_average"] = {"mean": statistics.fmean(samples[job]), "max": max(samples[job])}
        if "error" in raw:
            print(f"  {' '.join(job)} failed:\n{raw['stderr']}", file=sys.stderr)
        engine, dtype = job
        rows.append({"engine": engine, "weights": dtype, "summary": summarize(raw), "raw": raw})

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    report = {
        "model": MODEL,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": {
            "python": platform.python_version(),
            "torch": version("torch"),
            "transformers": version("transformers"),
            "llama_cpp_python": llama_version,
        },
        "revision": git_revision(),
        "quick": args.quick,
        "plan": dataclasses.asdict(plan),
        "dtypes": args.dtypes,
        "transformers_attention": ATTN_IMPLEMENTATION,
        "notes": notes,
        "rows": rows,
    }
    loads = [r["raw"]["load_average"] for r in rows]
    if loads:
        busiest = max(x["max"] for x in loads)
        report["notes"].append(
            f"1-minute load average while the engines ran: mean"
            f" {statistics.fmean(x['mean'] for x in loads):.1f}, max {busiest:.1f}, on"
            f" {os.cpu_count()} cores (this benchmark alone accounts for about {THREADS})."
            + (" The machine was shared: timings are unreliable." if busiest > THREADS + 1 else "")
        )
    report["notes"] += compare(report)
    table = render(report)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{args.out}_quick" if args.quick else args.out  # a smoke run keeps the real one
    (RESULTS / f"{stem}.md").write_text(table)
    for row in rows:
        row["raw"].pop("stderr", None)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS / stem}.md and .json", file=sys.stderr)


if __name__ == "__main__":
    main()
