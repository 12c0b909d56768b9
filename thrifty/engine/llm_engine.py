"""The engine: requests in, one batched step at a time, text deltas out."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from thrifty import distributed
from thrifty.config import EngineConfig, ModelConfig
from thrifty.engine import ranks
from thrifty.engine.block_manager import BlockManager
from thrifty.engine.model_runner import (
    ModelRunner,
    check_kv_cache_fits,
    kv_bytes_per_token,
    num_kv_blocks,
)
from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.scheduler import Scheduler
from thrifty.engine.sequence import Sequence, TokenLogprob
from thrifty.engine.spec_decode import SpecDecoder
from thrifty.engine.structured import Grammars
from thrifty.errors import ThriftyError
from thrifty.loader.weights import load_model
from thrifty.tokenizer import Tokenizer


@dataclass
class StepOutput:
    """What one step produced for one sample of one request."""

    request_id: str
    index: int
    delta_text: str
    token_ids: list[int]  # tokens appended this step
    logprobs: list[TokenLogprob]
    finish_reason: str | None


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def num_cached_tokens(self) -> int:
        return self.seqs[0].num_cached_tokens


class LLMEngine:
    def __init__(self, path: Path, config: EngineConfig, *, allow_pickle: bool = False):
        try:  # a user-given name: check it before loading weights onto it
            torch.empty(0, device=config.device)
        except (RuntimeError, AssertionError) as e:  # torch raises both for missing backends
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ThriftyError(f"device {config.device!r} is not usable: {why}") from None
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.other_ranks = None  # ranks 1..N-1, when this one spawned them
        if config.tensor_parallel_size > 1:
            if config.num_speculative_tokens:
                raise ThriftyError("speculative decoding does not work with tensor parallelism yet")
            config, self.other_ranks = ranks.join(path, config, allow_pickle)
        self.path = Path(path)
        self.model_config = cfg = ModelConfig.from_dir(self.path)
        # Sized from the engine config before anything is loaded: a KV cache past the device's
        # memory is refused, and the rotary table covers the context served, which the KV cache
        # bounds, not the checkpoint's max_position_embeddings (MTP layers only shrink the cache).
        bytes_per_token = kv_bytes_per_token(cfg, config.cache_dtype)
        check_kv_cache_fits(config, bytes_per_token)
        capacity = num_kv_blocks(config, bytes_per_token) * config.block_size
        context = min(config.max_model_len or cfg.max_position_embeddings, capacity)
        self.tokenizer = Tokenizer.from_dir(self.path, cfg.eos_token_ids)
        model = load_model(
            self.path,
            cfg,
            dtype=config.dtype,
            device=config.device,
            allow_pickle=allow_pickle,
            quantization=config.quantization,
            max_positions=context,
        )
        if not config.num_speculative_tokens and getattr(model, "num_mtp_layers", 0):
            model.drop_mtp()  # only a draft: without speculation, no weights and no cache layer
        self.runner = ModelRunner(model, self.model_config, config)
        # Every rank's weight bytes (each loads only its shards), for /thrifty/status and `ps`.
        tensors = [*model.parameters(), *model.buffers()]
        local_bytes = sum(t.numel() * t.element_size() for t in tensors)
        self.rank_weight_bytes = (
            distributed.gather_object(local_bytes)
            if config.tensor_parallel_size > 1
            else [local_bytes]
        )
        capacity = self.runner.num_blocks * config.block_size
        # A sequence must always fit in the cache alone, or preemption could never make room.
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings, capacity
        )
        self.config = config
        self.blocks = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config, self.blocks)
        self.spec: SpecDecoder | None = None
        if config.num_speculative_tokens > 0:
            if not getattr(model, "num_mtp_layers", 0):
                raise ThriftyError(
                    "speculative decoding needs a checkpoint with MTP layers "
                    "(DeepSeek-V3's num_nextn_predict_layers); this one has none"
                )
            self.spec = SpecDecoder(self.runner, self.blocks, config.num_speculative_tokens)
        self.grammars = Grammars(self.tokenizer, self.model_config.vocab_size)
        think = tuple(self.tokenizer.token_id(t) for t in ("<think>", "</think>"))
        self.think_ids: tuple[int, int] | None = None if None in think else think  # type: ignore
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        token_hook: Callable[[Sequence, int], list[int]] | None = None,
    ) -> str:
        """Queue a prompt (text, or token ids) for generation; returns its request id.

        `token_hook` (see Sequence.token_hook) may replace or extend each sampled token.
        """
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ThriftyError(f"duplicate request id {request_id!r}")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ThriftyError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ThriftyError(
                f"the prompt has {len(ids)} tokens; this model's context holds {self.max_model_len}"
                " including at least one generated token"
            )
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ThriftyError(f"prompt token ids must be in [0, {vocab})")
        if params.constraint is not None and self.spec is not None:
            raise ThriftyError("structured output does not work with speculative decoding yet")
        guides = [self._guide(params, ids) for _ in range(params.n)]
        seqs: list[Sequence] = []
        for i in range(params.n):
            leader = seqs[0] if seqs else None
            seqs.append(
                Sequence.create(
                    request_id, i, ids, params, self.tokenizer, self.max_model_len, leader
                )
            )
        for seq, guide in zip(seqs, guides, strict=True):
            seq.token_hook, seq.guide = token_hook, guide
            self.scheduler.add(seq)
        self.requests[request_id] = Request(request_id, ids, params, seqs)
        return request_id

    def _guide(self, params: SamplingParams, prompt_ids: list[int]):
        if params.constraint is None:
            return None
        think = self.think_ids
        # A template that opens the reasoning ends the prompt with <think> (and a newline).
        tail = prompt_ids[-3:]
        in_reasoning = (
            think is not None and think[0] in tail and think[1] not in tail[tail.index(think[0]) :]
        )
        return self.grammars.guide(params.constraint, think, in_reasoning)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")

    def abort_sample(self, request_id: str, index: int) -> None:
        """Stop one sample of a request now and free its KV blocks; its siblings go on."""
        request = self.requests.get(request_id)
        if request is None or not 0 <= index < len(request.seqs):
            raise ThriftyError(f"no sample {index} in request {request_id!r}")
        seq = request.seqs[index]
        if not seq.finished:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[StepOutput]:
        """Schedule, run one forward pass, sample, and report what changed."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        if self.spec is not None:  # several tokens per sequence where drafts are accepted
            seqs, token_lists, logprobs = self.spec.step(batch)
        else:
            seqs, tokens, logprobs = self.runner.step(batch)
            token_lists = [[t] for t in tokens]
        for seq, n in batch:
            seq.num_computed_tokens += n
            self.blocks.commit(seq)
        outputs = []
        now = time.perf_counter()
        for seq, toks, lp in zip(seqs, token_lists, logprobs, strict=True):
            token = toks[0]
            appended = seq.append(token, self.tokenizer.eos_token_ids)
            if appended[:1] != [token]:  # the token hook replaced the sampled token
                lp = None
            for t in toks[1:]:  # accepted speculative tokens
                if seq.finish_reason is not None:
                    break
                appended += seq.append(t, self.tokenizer.eos_token_ids)
            if lp is not None:
                seq.logprobs.append(lp)
            request = self.requests[seq.request_id]
            request.first_token_time = request.first_token_time or now
            if seq.finish_reason is not None:
                self.scheduler.finish(seq, seq.finish_reason)
            outputs.append(
                StepOutput(
                    seq.request_id,
                    seq.index,
                    seq.take_delta(),
                    appended,
                    [lp] if lp is not None else [],
                    seq.finish_reason,
                )
            )
        if self.spec is not None:
            self.spec.propose()  # the MTP layer catches up and drafts for the next step
        return outputs

    def pop_finished(self, request_id: str) -> Request | None:
        """Forget a finished request and return it."""
        request = self.requests.get(request_id)
        if request is not None and request.finished:
            return self.requests.pop(request_id)
        return None
