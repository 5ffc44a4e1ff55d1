"""N worker threads over one ``OmniRunner`` (one session pool under the memory policy), a bounded
queue, and cancellation.

A request becomes a :class:`Job`; its worker runs ``runner.chat`` with ``on_text``/``on_audio``
callbacks that push events (``text``, ``audio``, ``done``, ``error``) onto the job's asyncio
queue. Cancelling a job (its client went away) makes the next callback raise, which unwinds
``chat`` through its ``finally`` blocks: the thinker's and the speech stages' sessions are
given back to the pool. A full queue (``workers + max_queue`` jobs) is an APIError 429 with
``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from omni_runtime.errors import OmniError
from omni_runtime.server.errors import APIError, from_omni_error
from omni_runtime.server.metrics import Metrics
from omni_runtime.server.openai_map import PARAMS, Call, sampling_for

log = logging.getLogger("omni_runtime.server")


class Cancelled(Exception):
    """The client went away: stop generating."""


class _Stopped(Exception):
    """A stop sequence was generated."""


@dataclass
class Job:
    call: Call
    loop: asyncio.AbstractEventLoop
    started: float = field(default_factory=time.perf_counter)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    ttft: float | None = None
    first_audio: float | None = None

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening
            self.cancel.set()


class StopFilter:
    """Holds back text that may be the start of a stop sequence; ``hit`` once one appears."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.keep = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.text = ""  # everything let through
        self.hit = False

    def push(self, piece: str) -> str:
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.hit = self.pending[:cut], "", True
        elif self.keep and len(self.pending) > self.keep:
            out, self.pending = self.pending[:-self.keep], self.pending[-self.keep:]
        elif self.keep:
            out = ""
        else:
            out, self.pending = self.pending, ""
        self.text += out
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        self.text += out
        return out


class Engine:
    """Runs jobs on ``workers`` threads sharing ``runner``; at most ``max_queue`` wait."""

    def __init__(self, runner, workers: int = 1, max_queue: int = 16, metrics: Metrics | None = None):
        self.runner = runner
        self.workers = workers
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="omni-worker")
        self._lock = threading.Lock()
        self.queued = 0
        self.running = 0

    def submit(self, call: Call, loop: asyncio.AbstractEventLoop) -> Job:
        with self._lock:
            if self.queued + self.running >= self.workers + self.max_queue:
                raise APIError(429, f"the server is busy: {self.running} requests running and {self.queued} "
                                    f"waiting (queue full); retry shortly", type="rate_limit_error",
                               code="queue_full", headers={"Retry-After": "1"})
            self.queued += 1
        job = Job(call, loop)
        self._executor.submit(self._work, job)
        return job

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _work(self, job: Job) -> None:
        with self._lock:
            self.queued -= 1
            self.running += 1
        try:
            if job.cancel.is_set():
                job.emit("error", Cancelled())
                return
            job.emit("done", self._run(job))
        except Cancelled as exc:
            job.emit("error", exc)
        except OmniError as exc:
            job.emit("error", from_omni_error(exc, {**PARAMS, "max_new_tokens": job.call.max_tokens_field}))
        except APIError as exc:
            job.emit("error", exc)
        except Exception:  # noqa: BLE001 - logged with its traceback, answered without it
            log.exception("request failed")
            job.emit("error", APIError(500, "internal error while generating (see the server log)",
                                       type="server_error", code="internal_error"))
        finally:
            with self._lock:
                self.running -= 1

    def request_for(self, call: Call):
        runner = self.runner
        request = call.request
        if request.speech and not runner.has_speech:
            raise APIError(400, "this model has no speech output (the bundle has no talker or token2wav graphs)",
                           param="modalities", code="unsupported_value")
        changes = {"sampling": sampling_for(call.temperature, call.top_p, runner.default_sampling())}
        if request.speech and call.greedy_talker:
            changes["talker_sampling"] = runner.default_talker_sampling(False)
        return replace(request, **changes)

    def _run(self, job: Job) -> dict:
        call = job.call
        request = self.request_for(call)
        stops = StopFilter(call.stop)

        def on_text(piece: str) -> None:
            if job.cancel.is_set():
                raise Cancelled()
            if job.ttft is None:
                job.ttft = time.perf_counter() - job.started
                self.metrics.observe_ttft(job.ttft)
            out = stops.push(piece) if call.stop else piece
            if out:
                job.emit("text", out)
            if stops.hit:
                raise _Stopped()

        def on_audio(pcm, last: bool) -> None:
            if job.cancel.is_set():
                raise Cancelled()
            if job.first_audio is None:
                job.first_audio = time.perf_counter() - job.started
                self.metrics.observe_first_audio(job.first_audio)
            job.emit("audio", pcm, last)

        try:
            result = self.runner.chat(request, on_text=on_text, on_audio=on_audio if request.speech else None)
        except _Stopped:
            prompt = len(self.runner.prepare(request).inputs.ids)
            completion = len(self.runner.encode(stops.text))
            self.metrics.tokens(prompt, completion)
            return {"text": stops.text, "finish_reason": "stop", "prompt_tokens": prompt,
                    "completion_tokens": completion, "result": None}
        if call.stop:
            rest = stops.flush()
            if rest:
                job.emit("text", rest)
        self.metrics.tokens(len(result.prompt_ids), len(result.token_ids))
        finish = {"eos": "stop"}.get(result.finish_reason, "length")
        return {"text": result.text, "finish_reason": finish, "prompt_tokens": len(result.prompt_ids),
                "completion_tokens": len(result.token_ids), "result": result}
