"""The engine loop: one thread that runs `LLMEngine.step()` continuously beside the HTTP handlers.

The engine is synchronous and not thread-safe, so only this thread touches it. Handlers talk to
it through a command queue (add, abort) drained between steps, and get their results on an
asyncio.Queue, filled from the loop thread with `call_soon_threadsafe`. With nothing to do the
thread sleeps on an Event that every command sets.

Test-time scaling jobs (thrifty.tts) run here too: the loop owns a JobSet, hands it every step's
outputs, and delivers each job, once done, as a JobDone. A job's requests never reach a queue.

The server loads the model on that same thread (EngineThread). With OpenMP, torch's CPU backend,
every thread that runs a parallel region keeps a team of worker threads for good, and once more
threads are in teams than there are cores, libgomp's workers sleep between regions instead of
spinning. A model loaded on the main thread and stepped on another left an idle team behind:
batch-1 decode of SmolLM2 on 2 cores fell from about 80 to 50 tokens/s.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import threading
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any

from thrifty.engine.llm_engine import LLMEngine, StepOutput
from thrifty.engine.sampling_params import SamplingParams
from thrifty.engine.sequence import Sequence
from thrifty.errors import ThriftyError
from thrifty.tts import Job, JobSet

TokenHook = Callable[[Sequence, int], list[int]]


@dataclass
class Finished:
    """The last item for a request: every sample is done."""

    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclass
class Failed:
    request_id: str
    status: int
    message: str


@dataclass
class JobDone:
    """A test-time scaling job is done: read `job.result()`."""

    job: Job


Item = StepOutput | Finished | Failed | JobDone


class EngineThread:
    """One thread that runs the calls given to it, in order: a server's torch work (loading the
    model, warming it, then the engine loop) all on one thread, so that OpenMP keeps one team.
    A daemon, unlike ThreadPoolExecutor's workers, so that a loop still running never holds up
    the process's exit."""

    def __init__(self) -> None:
        self._calls: SimpleQueue[tuple[Callable[[], Any], Future]] = SimpleQueue()
        threading.Thread(target=self._serve, name="thrifty-engine", daemon=True).start()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the thread after the calls before it; its result (or error) comes back
        on the Future."""
        done: Future = Future()
        self._calls.put((fn, done))
        return done

    def _serve(self) -> None:
        while True:
            fn, done = self._calls.get()
            try:
                done.set_result(fn())
            except BaseException as e:  # handed to the caller, on the Future
                done.set_exception(e)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, thread: EngineThread | None = None):
        """`thread`: the thread the engine was loaded on, to run the loop on too (else a new
        one)."""
        self.engine = engine
        self._commands: deque[tuple] = deque()  # deque appends and pops are thread-safe
        self._wake = threading.Event()
        self._queues: dict[str, asyncio.Queue[Item]] = {}  # engine thread only
        self._jobs = JobSet(engine)  # engine thread only
        self._job_queues: dict[str, asyncio.Queue[Item]] = {}  # by job id; engine thread only
        self._stopping = False
        self._closing = False
        self._thread = thread
        self._running: Future | None = None  # the loop, once started
        self._loop: asyncio.AbstractEventLoop | None = None
        self.num_steps = 0
        self._steps_at_trim = 0

    def start(self) -> None:
        """Start the loop on its thread; call from the event loop that will read the results."""
        self._loop = asyncio.get_running_loop()
        self._thread = self._thread or EngineThread()
        self._running = self._thread.call(self._run)
        self._running.add_done_callback(_report)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._running is not None:
            wait([self._running])

    @property
    def alive(self) -> bool:
        running = self._running is not None and not self._running.done()
        return running and not (self._stopping or self._closing)

    def add(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        queue: asyncio.Queue[Item],
        token_hook: TokenHook | None = None,
    ) -> None:
        """Queue a request; its StepOutputs, then a Finished (or a Failed), arrive on `queue`."""
        self._commands.append(("add", request_id, prompt_ids, params, queue, token_hook))
        self._wake.set()

    def add_job(self, job: Job, queue: asyncio.Queue[Item]) -> None:
        """Queue a test-time scaling job (built on this engine); a JobDone or a Failed arrives
        on `queue`. From here on only the engine thread touches the job, until it is done."""
        self._commands.append(("job", job, queue))
        self._wake.set()

    def abort_job(self, job_id: str) -> None:
        """Stop every request of a job and free their blocks before the next step."""
        self._commands.append(("abort_job", job_id))
        self._wake.set()

    def close(self) -> None:
        """The server is going down: fail every request (503) now, so that open streams end."""
        self._closing = True
        self._commands.append(("close",))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks before the next step."""
        self._commands.append(("abort", request_id))
        self._wake.set()

    # -- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._wake.clear()  # before draining: a command queued after the drain re-sets it
            deliveries = self._drain()
            if engine.has_unfinished():
                try:
                    deliveries += self._step()
                except Exception:  # a bug: fail the requests in flight, keep serving
                    traceback.print_exc()
                    deliveries += self._fail_all(500, "the engine failed on this request")
            if deliveries:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(_deliver, deliveries)
            if not engine.has_unfinished() and not self._commands:
                if self.num_steps != self._steps_at_trim:
                    self._steps_at_trim = self.num_steps
                    _trim_heap()
                self._wake.wait()

    def _drain(self) -> list[tuple[asyncio.Queue[Item], Item]]:
        out: list[tuple[asyncio.Queue[Item], Item]] = []
        while self._commands:
            cmd = self._commands.popleft()
            if cmd[0] == "close":
                out += self._fail_all(503, "the server is shutting down")
            elif cmd[0] == "job":
                out += self._start_job(cmd[1], cmd[2])
            elif cmd[0] == "abort_job":
                self._jobs.abort(cmd[1])
                self._job_queues.pop(cmd[1], None)
            elif cmd[0] == "add":
                _, rid, ids, params, queue, hook = cmd
                if self._closing:
                    out.append((queue, Failed(rid, 503, "the server is shutting down")))
                    continue
                try:
                    self.engine.add_request(ids, params, rid, token_hook=hook)
                except ThriftyError as e:
                    out.append((queue, Failed(rid, 400, str(e))))
                    continue
                except Exception:  # a bug: this request fails, the loop goes on
                    traceback.print_exc()
                    self.engine.abort(rid)
                    out.append((queue, Failed(rid, 500, "the engine could not take the request")))
                    continue
                self._queues[rid] = queue
            else:
                rid = cmd[1]
                self.engine.abort(rid)
                self._queues.pop(rid, None)
        return out

    def _start_job(self, job: Job, queue: asyncio.Queue[Item]) -> list[tuple[asyncio.Queue, Item]]:
        if self._closing:
            return [(queue, Failed(job.job_id, 503, "the server is shutting down"))]
        try:
            self._jobs.start(job)
        except ThriftyError as e:
            return [(queue, Failed(job.job_id, 400, str(e)))]
        except Exception:  # a bug: this job fails, the loop goes on
            traceback.print_exc()
            for rid in job.pending:
                self.engine.abort(rid)
            return [(queue, Failed(job.job_id, 500, "the engine could not take the request"))]
        self._job_queues[job.job_id] = queue
        return []

    def _step(self) -> list[tuple[asyncio.Queue[Item], Item]]:
        engine = self.engine
        outputs = engine.step()
        self.num_steps += 1
        out: list[tuple[asyncio.Queue[Item], Item]] = []
        done = set()
        for o in outputs:
            queue = self._queues.get(o.request_id)
            if queue is None:
                continue
            out.append((queue, o))
            if o.finish_reason is not None:
                done.add(o.request_id)
        for rid in done:
            request = engine.pop_finished(rid)
            if request is not None:
                queue = self._queues.pop(rid)
                out.append(
                    (queue, Finished(rid, len(request.prompt_token_ids), request.num_cached_tokens))
                )
        # The jobs take in their finished requests here, and may launch their next waves.
        for job in self._jobs.observe(outputs):
            queue = self._job_queues.pop(job.job_id, None)
            if queue is not None:
                out.append((queue, JobDone(job)))
        return out

    def _fail_all(self, status: int, message: str) -> list[tuple[asyncio.Queue[Item], Item]]:
        out: list[tuple[asyncio.Queue[Item], Item]] = []
        for rid, queue in list(self._queues.items()):
            self.engine.abort(rid)
            out.append((queue, Failed(rid, status, message)))
        self._queues.clear()
        self._jobs.abort_all()
        for job_id, queue in self._job_queues.items():
            out.append((queue, Failed(job_id, status, message)))
        self._job_queues.clear()
        return out


def _report(loop: Future) -> None:
    """The loop ended: if by an error (a bug), print it, as an uncaught one in a thread would be."""
    if loop.exception() is not None:
        traceback.print_exception(loop.exception())


def _trim_heap() -> None:
    """Going idle: hand the freed heap (a large batch's activations) back to the OS (glibc)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _load_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _load_malloc_trim()


def _deliver(deliveries: list[tuple[asyncio.Queue[Item], Item]]) -> None:
    for queue, item in deliveries:
        queue.put_nowait(item)
