"""Driving jobs: on an engine of our own (`run_jobs`, `run_strategy`), or beside a loop that
already steps the engine, such as the server's engine thread (`JobSet`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from thrifty.tts.config import TTSConfig
from thrifty.tts.strategies import Job


class JobSet:
    """The jobs in flight on one engine. Whoever steps the engine hands each step's outputs to
    `observe`, which returns the jobs that finished. Every call must come from the thread that
    steps the engine (the engine is not thread-safe)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.active: dict[str, Job] = {}

    def start(self, job: Job) -> None:
        """Queue the job's first requests; they run from the next step on."""
        if job.job_id in self.active:
            raise ValueError(f"job {job.job_id!r} is already running")
        job.start()
        self.active[job.job_id] = job

    def owns(self, request_id: str) -> bool:
        return request_id.rsplit("-w", 1)[0] in self.active

    def observe(self, outputs: Iterable[Any]) -> list[Job]:
        """Feed one step's outputs to their jobs; returns (and forgets) the jobs now done."""
        for out in outputs:
            job = self.active.get(out.request_id.rsplit("-w", 1)[0])
            if job is not None:
                job.on_output(out)
        done = []
        for job_id, job in list(self.active.items()):
            job.collect()  # takes in finished requests, may launch the next wave
            if job.done:
                del self.active[job_id]
                done.append(job)
        return done

    def abort(self, job_id: str) -> None:
        """Stop a job's requests now and free their blocks."""
        job = self.active.pop(job_id, None)
        if job is not None:
            for rid in job.pending:
                self.engine.abort(rid)

    def abort_all(self) -> None:
        for job_id in list(self.active):
            self.abort(job_id)


def run_jobs(
    engine: Any,
    jobs: Iterable[Job],
    max_active: int | None = None,
    on_done: Callable[[Job], None] | None = None,
) -> None:
    """Run jobs to completion on one engine, at most `max_active` at a time (all by default);
    `on_done` is called with each job as it finishes."""
    queue = list(jobs)[::-1]
    running = JobSet(engine)
    try:
        while queue or running.active:
            while queue and (max_active is None or len(running.active) < max_active):
                running.start(queue.pop())
            for job in running.observe(engine.step()):
                if on_done is not None:
                    on_done(job)
    finally:
        running.abort_all()


def run_strategy(engine: Any, prompt: str | list[int], config: TTSConfig | dict) -> dict[str, Any]:
    """Run one strategy on one prompt (text or token ids); returns the chosen answer, the votes,
    the tokens spent and every sample. `engine` is an LLMEngine (or anything with its API)."""
    if isinstance(config, dict):
        config = TTSConfig.from_dict(config)
    job = Job(engine, prompt, config)
    run_jobs(engine, [job])
    return job.result()
