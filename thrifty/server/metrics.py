"""Prometheus metrics for `GET /metrics`, in a registry of the server's own (not the global one).

Counters and latency histograms are fed by the request handlers; the engine's state (sequences
running and waiting, KV blocks, prefix-cache hits) is read when scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from thrifty.engine.llm_engine import LLMEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60)


class Metrics:
    def __init__(self, engine: LLMEngine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "thrifty_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("thrifty_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter(
            "thrifty_generation_tokens", "Generated tokens", registry=r
        )
        self.cached_tokens = Counter(
            "thrifty_cached_prompt_tokens",
            "Prompt tokens served from the prefix cache",
            registry=r,
        )
        self.ttft = Histogram(
            "thrifty_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "thrifty_inter_token_latency_seconds",
            "Time between tokens of one sample",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "thrifty_request_latency_seconds",
            "Arrival to last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        sched, blocks = engine.scheduler, engine.blocks
        gauges = [
            ("num_seqs_running", "Sequences in the running batch", lambda: len(sched.running)),
            ("num_seqs_waiting", "Sequences waiting to be admitted", lambda: len(sched.waiting)),
            ("kv_blocks_used", "KV-cache blocks held", lambda: blocks.num_used_blocks),
            ("kv_blocks_total", "KV-cache blocks in all", lambda: blocks.num_blocks - 1),
            ("num_preemptions", "Sequences preempted so far", lambda: sched.num_preemptions),
            (
                "prefix_cache_queries_tokens",
                "Prompt tokens looked up",
                lambda: blocks.prefix_queries,
            ),
            ("prefix_cache_hits_tokens", "Prompt tokens found cached", lambda: blocks.prefix_hits),
            (
                "prefix_cache_hit_rate",
                "Prefix-cache hits / queries, in tokens",
                lambda: blocks.prefix_hits / max(blocks.prefix_queries, 1),
            ),
        ]
        for name, doc, read in gauges:
            Gauge(f"thrifty_{name}", doc, registry=r).set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def unlabelled(text: str) -> dict[str, float]:
    """The samples without labels of a `/metrics` page, by name (for tests and benchmarks)."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }
