"""The strategies, as jobs over the engine's public API (add_request / step / abort_sample /
pop_finished). A job owns the requests of one prompt; `run_jobs` steps one engine for many jobs
at once, so samples of different prompts share each batch as well as samples of one prompt.

A request with n samples shares the prompt's KV blocks: the siblings wait for the first sample's
prefill and then take its blocks from the prefix cache.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

from thrifty.engine.sampling_params import SamplingParams
from thrifty.tts.confidence import (
    WindowMonitor,
    threshold_from_warmup,
    token_confidence,
    trace_confidence,
)
from thrifty.tts.config import TTSConfig
from thrifty.tts.extract import extract_answer, to_number
from thrifty.tts.thinking import ThinkingBudget
from thrifty.tts.voting import consensus, decided, tally

_job_ids = itertools.count()


@dataclass
class Trace:
    """One finished (or stopped) sample."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    answer: str | None
    mean_logprob: float | None = None
    confidence: float | None = None  # deepconf trace confidence
    token_confidences: list[float] | None = None  # per token, where logprobs were asked for

    def summary(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "answer": self.answer,
            "tokens": len(self.token_ids),
            "finish_reason": self.finish_reason,
            "mean_logprob": self.mean_logprob,
            "confidence": self.confidence,
        }


@dataclass
class Job:
    """One prompt under one strategy."""

    engine: Any
    prompt: str | list[int]
    config: TTSConfig
    job_id: str = field(default_factory=lambda: f"tts-{next(_job_ids)}")
    traces: list[Trace] = field(default_factory=list)
    stopped: list[Trace] = field(default_factory=list)  # deepconf traces stopped early
    pending: set[str] = field(default_factory=set)  # request ids in flight
    waves: int = 0
    num_cached_tokens: int | None = None  # prompt tokens the first wave found in the cache
    threshold: float | None = None
    done: bool = False
    start_time: float = 0.0
    wall_s: float = 0.0
    monitors: dict[tuple[str, int], WindowMonitor] = field(default_factory=dict)
    # top-k logprobs to ask for even where the strategy needs none, so that other strategies
    # can be replayed on these samples (thrifty.tts.replay)
    record_logprobs: int | None = None

    # -- launching ------------------------------------------------------------------------
    def start(self) -> None:
        self.start_time = time.perf_counter()
        c = self.config
        if c.strategy == "greedy":
            self._launch(1, greedy=True)
        elif c.strategy == "adaptive":
            self._launch(min(c.wave, c.n))
        elif c.strategy == "deepconf" and c.early_stop:
            self._launch(c.warmup)
        else:
            self._launch(c.n)

    def _launch(self, n: int, *, greedy: bool = False) -> None:
        c = self.config
        # deepconf reads the top-k list; best-of-n only the chosen token's logprob
        needed = {"deepconf": c.top_logprobs, "best-of-n": 0}
        logprobs = needed.get(c.strategy, self.record_logprobs)
        params = SamplingParams(
            n=n,
            max_tokens=c.max_tokens,
            temperature=0.0 if greedy else c.temperature,
            top_p=c.top_p,
            top_k=c.top_k,
            seed=None if c.seed is None else c.seed + 7919 * self.waves,
            logprobs=logprobs,
        )
        hook = None
        if c.max_thinking_tokens is not None or c.min_thinking_tokens:
            hook = ThinkingBudget(
                self.engine.tokenizer, c.max_thinking_tokens, c.min_thinking_tokens
            )
        rid = f"{self.job_id}-w{self.waves}"
        self.engine.add_request(self.prompt, params, rid, token_hook=hook)
        self.pending.add(rid)
        self.waves += 1

    # -- following the engine --------------------------------------------------------------
    def on_output(self, out: Any) -> None:
        """Watch a step's output; deepconf stops traces whose confidence drops too low."""
        if self.threshold is None or not out.logprobs or out.finish_reason is not None:
            return
        monitor = self.monitors.setdefault(
            (out.request_id, out.index), WindowMonitor(self.config.window)
        )
        for lp in out.logprobs:
            group = monitor.push(token_confidence(lp))
            if group is not None and group < self.threshold:
                self.engine.abort_sample(out.request_id, out.index)
                return

    def collect(self) -> None:
        """Take in finished requests and decide what comes next."""
        for rid in list(self.pending):
            request = self.engine.pop_finished(rid)
            if request is None:
                continue
            self.pending.discard(rid)
            if self.num_cached_tokens is None:
                self.num_cached_tokens = request.num_cached_tokens
            for seq in request.seqs:
                trace = self._trace(seq)
                (self.stopped if seq.finish_reason == "abort" else self.traces).append(trace)
        if not self.pending:
            self._next()

    def _trace(self, seq: Any) -> Trace:
        text = seq.output_text
        lps = seq.logprobs
        # A sample cut off at max_tokens votes only if it had already stated an answer.
        answer = extract_answer(text, last_number=seq.finish_reason != "length")
        if self.config.numeric and answer is not None and to_number(answer) is None:
            answer = None
        trace = Trace(text, list(seq.output_token_ids), seq.finish_reason, answer)
        if lps:
            trace.mean_logprob = sum(lp.logprob for lp in lps) / len(lps)
            confs = [token_confidence(lp) for lp in lps]
            trace.confidence = trace_confidence(confs, self.config.window)
            trace.token_confidences = confs
        return trace

    def _next(self) -> None:
        c = self.config
        used = len(self.traces) + len(self.stopped)
        if c.strategy == "adaptive" and used < c.n:
            # Decided between engine steps (in the server, on the engine's thread).
            answers = [t.answer for t in self.traces]
            if not decided(answers, used, c.n, c.stopping_rule, c.confidence):
                self._launch(min(c.wave, c.n - used))
                return
        if c.strategy == "deepconf" and c.early_stop:
            if self.threshold is None:  # the warm-up is in
                confs = [t.confidence or 0.0 for t in self.traces]
                self.threshold = threshold_from_warmup(confs, c.keep)
            if used < c.n and not self._agreed():
                self._launch(min(c.wave, c.n - used))
                return
        self.done = True
        self.wall_s = time.perf_counter() - self.start_time

    def _agreed(self) -> bool:
        """Whether DeepConf draws no more traces: the finished traces' confidence-weighted vote
        is decided (the paper's consensus share), or adaptive consistency's rule is sure."""
        c = self.config
        answers = [t.answer for t in self.traces]
        if c.deepconf_stop == "adaptive":
            used = len(self.traces) + len(self.stopped)
            return decided(answers, used, c.n, c.stopping_rule, c.confidence)
        if c.consensus is None:
            return False
        weights = [t.confidence or 0.0 for t in self.traces]
        return consensus(tally(answers, weights, symbolic=False)) >= c.consensus

    # -- the answer ------------------------------------------------------------------------
    def result(self) -> dict[str, Any]:
        c = self.config
        traces = self.traces
        weights = None
        chosen: Trace | None = None
        if c.strategy == "deepconf":
            # Online, every finished trace votes (the threshold already stopped the unsure
            # ones); offline, the most confident `keep` share. Votes weighted by confidence.
            if not c.early_stop:
                ranked = sorted(traces, key=lambda t: -(t.confidence or 0.0))
                traces = ranked[: math.ceil(c.keep * len(ranked))]
            weights = [t.confidence or 0.0 for t in traces]
        if c.strategy == "best-of-n" and traces:
            prompt_text = (
                self.prompt
                if isinstance(self.prompt, str)
                else self.engine.tokenizer.decode(self.prompt)
            )
            scores = [
                c.scorer(prompt_text, t.text)
                if c.scorer
                else (t.mean_logprob if t.mean_logprob is not None else float("-inf"))
                for t in traces
            ]
            best = max(range(len(traces)), key=lambda i: (scores[i], -i))
            votes = tally([traces[best].answer], symbolic=False)
            chosen = traces[best]
        else:
            votes = tally([t.answer for t in traces], weights, symbolic=c.symbolic)
        answer = votes[0].answer if votes else None
        if chosen is None:
            winners = [t for t in traces if t.answer is not None and votes and t.answer == answer]
            chosen = winners[0] if winners else (traces[0] if traces else None)
        all_traces = self.traces + self.stopped
        return {
            "strategy": c.strategy,
            "answer": answer,
            "text": chosen.text if chosen else "",
            "finish_reason": chosen.finish_reason if chosen else None,
            "votes": {v.answer: v.weight for v in votes},
            "num_samples": len(all_traces),
            "num_stopped_early": len(self.stopped),
            "tokens": sum(len(t.token_ids) for t in all_traces),
            "num_cached_tokens": self.num_cached_tokens or 0,
            "wall_s": self.wall_s,
            "threshold": self.threshold,
            "samples": [t.summary() for t in all_traces],
        }
