"""Stage timeline of one request inside its process: segments, peak RSS per segment, session loads, graph time.

A :class:`Tracer` cuts the request into named segments (the stages of ``omni_export.bench.STAGES``
and host segments between them: ``setup``, ``prepare``, ``host``); ``enter(name)`` closes the
current segment and opens the next. Each segment records its wall time, its peak RSS, the
sessions created in it and the time spent in each graph's ``run``.

Peak RSS per segment: Linux keeps a process's RSS high-water mark (``VmHWM`` in
``/proc/self/status``) for every thread and page fault, exactly; writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS. So a segment's peak is ``VmHWM`` read
when it closes, after a reset when it opened (``peak_method: "vmhwm"``). Where the reset is not
allowed, a thread samples ``VmRSS`` every 2 ms instead (``"sampled"``: it can miss a spike
shorter than that). The reset also lowers the process's ``ru_maxrss``, so the process peak is
the largest segment peak, not what ``wait4`` reports.

Nothing here imports torch or onnxruntime: the runtime side and the PyTorch side share it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_SAMPLE_S = 0.002


def status_bytes(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to its current RSS; False where not allowed."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def open_fds() -> int | None:
    """Open file descriptors of this process (entries of /proc/self/fd), None off Linux."""
    try:
        return sum(1 for _ in Path("/proc/self/fd").iterdir())
    except OSError:
        return None


@dataclass
class Segment:
    name: str
    start: float  # seconds since the tracer's origin
    end: float | None = None
    rss_start_bytes: int | None = None
    rss_end_bytes: int | None = None
    peak_rss_bytes: int | None = None
    loads: list[dict] = field(default_factory=list)  # {"graph", "seconds", "bytes", "cached"}
    graph_runs: dict[str, dict] = field(default_factory=dict)  # graph -> {"seconds", "calls"}
    loaded_bytes_max: int = 0  # largest bytes of loaded sessions seen in this segment (pool.loaded_bytes)
    loaded_graphs: list[str] = field(default_factory=list)  # sessions loaded at that moment

    def to_json(self) -> dict:
        return {"name": self.name, "start": self.start, "end": self.end, "seconds": (self.end or self.start) - self.start,
                "rss_start_bytes": self.rss_start_bytes, "rss_end_bytes": self.rss_end_bytes,
                "peak_rss_bytes": self.peak_rss_bytes, "loads": self.loads, "graph_runs": self.graph_runs,
                "loaded_bytes_max": self.loaded_bytes_max, "loaded_graphs": self.loaded_graphs}


class Tracer:
    """Segments of one process's request (module docstring). Thread-safe: the talker thread
    records graph runs while the main thread runs token2wav."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.origin = clock()
        self.segments: list[Segment] = []
        self._lock = threading.RLock()
        self._current: Segment | None = None
        self.peak_method = "vmhwm" if reset_peak_rss() else "sampled"
        self._sampled_peak = 0
        self._stop = threading.Event()
        self._sampler = None
        if self.peak_method == "sampled":
            self._sampler = threading.Thread(target=self._sample, name="omni-bench-rss", daemon=True)
            self._sampler.start()

    def now(self) -> float:
        """Seconds since the tracer was made."""
        return self.clock() - self.origin

    @property
    def current(self) -> str | None:
        return None if self._current is None else self._current.name

    def _sample(self) -> None:
        while not self._stop.wait(_SAMPLE_S):
            rss = status_bytes("VmRSS") or 0
            with self._lock:
                self._sampled_peak = max(self._sampled_peak, rss)

    def _close(self, now: float) -> None:
        seg = self._current
        if seg is None:
            return
        seg.end = now
        seg.rss_end_bytes = status_bytes("VmRSS")
        if self.peak_method == "vmhwm":
            seg.peak_rss_bytes = status_bytes("VmHWM")
        else:
            seg.peak_rss_bytes = max(self._sampled_peak, seg.rss_end_bytes or 0, seg.rss_start_bytes or 0)
        self._current = None

    def enter(self, name: str) -> None:
        """Close the current segment (unless it is ``name`` already) and open ``name``."""
        with self._lock:
            if self._current is not None and self._current.name == name:
                return
            now = self.now()
            self._close(now)
            rss = status_bytes("VmRSS")
            if self.peak_method == "vmhwm":
                reset_peak_rss()
            else:
                self._sampled_peak = rss or 0
            self._current = Segment(name, now, rss_start_bytes=rss)
            self.segments.append(self._current)

    def finish(self) -> None:
        """Close the last segment and stop sampling."""
        with self._lock:
            self._close(self.now())
        self._stop.set()

    def record_load(self, entry: dict) -> None:
        with self._lock:
            if self._current is not None:
                self._current.loads.append(dict(entry))

    def record_run(self, graph: str, seconds: float) -> None:
        with self._lock:
            if self._current is None:
                return
            runs = self._current.graph_runs.setdefault(graph, {"seconds": 0.0, "calls": 0})
            runs["seconds"] += seconds
            runs["calls"] += 1

    def record_loaded(self, loaded: dict[str, int]) -> None:
        """The pool's loaded sessions (graph -> bytes) at this moment."""
        total = sum(loaded.values())
        with self._lock:
            seg = self._current
            if seg is not None and total >= seg.loaded_bytes_max:
                seg.loaded_bytes_max = total
                seg.loaded_graphs = list(loaded)

    @property
    def peak_rss_bytes(self) -> int | None:
        """The largest segment peak (the process peak since the tracer was made)."""
        peaks = [s.peak_rss_bytes for s in self.segments if s.peak_rss_bytes is not None]
        return max(peaks) if peaks else None

    def to_json(self) -> dict:
        return {"peak_method": self.peak_method, "segments": [s.to_json() for s in self.segments]}


class TimedSession:
    """An onnxruntime session whose ``run`` / ``run_with_iobinding`` time goes to a tracer; every
    other attribute is the session's own."""

    __slots__ = ("_session", "_graph", "_tracer")

    def __init__(self, session, graph: str, tracer: Tracer):
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_graph", graph)
        object.__setattr__(self, "_tracer", tracer)

    def run(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._session.run(*args, **kwargs)
        finally:
            self._tracer.record_run(self._graph, time.perf_counter() - start)

    def run_with_iobinding(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._session.run_with_iobinding(*args, **kwargs)
        finally:
            self._tracer.record_run(self._graph, time.perf_counter() - start)

    def __getattr__(self, name):
        return getattr(self._session, name)
