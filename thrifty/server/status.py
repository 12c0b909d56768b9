"""What a server has loaded (GET /thrifty/status), and `thrifty ps`, which asks for it."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from thrifty import distributed
from thrifty.engine.llm_engine import LLMEngine
from thrifty.errors import ThriftyError
from thrifty.generation_defaults import GenerationDefaults


def _resident_bytes() -> int | None:
    try:  # Linux: resident pages are statm's second field
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Status:
    """The loaded model and the engine's load, read when asked."""

    def __init__(self, engine: LLMEngine, model_name: str, defaults: GenerationDefaults):
        self.engine, self.model_name, self.defaults = engine, model_name, defaults
        self.started = time.time()
        self.rank_weight_bytes = engine.rank_weight_bytes  # each rank's shards, in rank order
        self.weight_bytes = sum(self.rank_weight_bytes)
        # How the ranks' collectives travel (shared memory on one host), None for one process.
        several = len(self.rank_weight_bytes) > 1
        self.collectives = distributed.transport() if several else None

    def read(self) -> dict[str, Any]:
        e = self.engine
        return {
            "model": self.model_name,
            "path": str(e.path),
            "architecture": e.model_config.architecture,
            "dtype": str(e.config.dtype).removeprefix("torch."),
            "kv_cache_dtype": str(e.config.cache_dtype).removeprefix("torch."),
            "device": e.config.device,
            "quantization": e.config.quantization,
            "max_model_len": e.max_model_len,
            "weight_bytes": self.weight_bytes,
            "rank_weight_bytes": self.rank_weight_bytes,
            "collectives": self.collectives,
            "resident_bytes": _resident_bytes(),
            "uptime_s": round(time.time() - self.started, 1),
            "running": len(e.scheduler.running),
            "waiting": len(e.scheduler.waiting),
            "kv_blocks_used": e.blocks.num_used_blocks,
            "kv_blocks_total": e.blocks.num_blocks - 1,
            "sampling_defaults": {
                k: getattr(self.defaults, k)
                for k in ("temperature", "top_p", "top_k", "repetition_penalty")
            },  # fmt: skip
        }


def fetch_status(url: str, api_key: str | None = None, timeout_s: float = 5.0) -> str:
    """`thrifty ps`: one line about what the server at `url` has loaded."""
    request = urllib.request.Request(url.rstrip("/") + "/thrifty/status")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            s = json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            why = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            why = f"HTTP {e.code}"
        raise ThriftyError(f"{url}: {why}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ThriftyError(
            f"no thrifty server at {url} ({reason}); start one: thrifty serve"
        ) from None
    # Resident bytes are rank 0's process only: under TP the weights of all ranks say more.
    several = len(s.get("rank_weight_bytes", ())) > 1
    memory = s["weight_bytes"] if several else s["resident_bytes"] or s["weight_bytes"]
    quant = f", {s['quantization']}" if s["quantization"] else ""
    kv = s.get("kv_cache_dtype", "-")  # a server from before the field says nothing
    head = (
        f"{'MODEL':<28} {'SIZE':>9}  {'PROCESSOR':<18} {'KV CACHE':<9} {'CONTEXT':>8}  "
        f"{'RUNNING':>7}  UPTIME"
    )
    row = (
        f"{s['model']:<28} {memory / 1e6:>6.0f} MB  {s['device'] + ' ' + s['dtype'] + quant:<18}"
        f" {kv:<9} {s['max_model_len']:>8}  {s['running']:>3}+{s['waiting']:<3}"
        f"  {s['uptime_s']:.0f} s"
    )
    return f"{head}\n{row}"
