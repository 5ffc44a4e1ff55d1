"""Shared helpers of the benchmark scripts: run a child process and measure it.

``run_measured`` (``omni_export.bench.process.run_child``, the runner of ``omni-export bench``) runs
one command in its own process group and reaps it with ``os.wait4``,
which returns that child's own resource usage: ``ru_maxrss`` is its peak RSS (the number
``/usr/bin/time -v`` prints as "Maximum resident set size", GNU time reads it the same way).
A watchdog kills the child (its whole process group) when it runs past ``timeout`` seconds or
its RSS passes ``rss_limit`` bytes (polled every ``poll_s``), so a run that would exhaust the shared machine's memory is
reported as a failure instead of waking the OOM killer.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict
from pathlib import Path

GB = 1e9


from omni_export.bench.process import Child as Measured  # noqa: E402,F401  (one runner for bench and benchmarks/)
from omni_export.bench.process import available_memory, run_child  # noqa: E402


def default_rss_limit(margin_gb: float = 2.0) -> int | None:
    """Available memory now, less a margin: the default RSS limit of a measured child."""
    have = available_memory()
    return None if have is None else max(int(have - margin_gb * GB), int(GB))


def run_measured(cmd: list[str], timeout: float | None = None, rss_limit: int | None = None,
                 env: dict | None = None, poll_s: float = 0.1) -> Measured:
    """Run ``cmd``; its exit code, wall time, peak RSS (``ru_maxrss``) and output (module doc)."""
    return run_child(cmd, timeout=timeout, rss_limit=rss_limit, env=env, poll_s=poll_s)


def summarize(values: list[float]) -> dict:
    """``{median, min, max, runs}`` of repeated measurements (None fields when there are none)."""
    if not values:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def dir_bytes(path: Path, suffixes: tuple[str, ...] | None = None) -> int:
    """Total size of the files under ``path`` (only names ending in ``suffixes`` when given)."""
    total = 0
    for file in Path(path).rglob("*"):
        if file.is_file() and (suffixes is None or file.name.endswith(suffixes)):
            total += file.stat().st_size
    return total


def machine_info() -> dict:
    import platform

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "mem_available_bytes": available_memory()}


def write_json(path: Path, data: dict) -> None:
    """Atomically (a temporary file renamed over ``path``): an interrupted run leaves no half file."""
    from omni_runtime.atomic import write_json_atomic

    write_json_atomic(path, data, indent=2, default=_jsonable)


def _jsonable(value):
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
