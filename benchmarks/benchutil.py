"""Shared helpers of the benchmark scripts: run a child process and measure it.

``run_measured`` runs one command in its own process group and reaps it with ``os.wait4``,
which returns that child's own resource usage: ``ru_maxrss`` is its peak RSS (the number
``/usr/bin/time -v`` prints as "Maximum resident set size", GNU time reads it the same way).
A watchdog kills the child (its whole process group) when it runs past ``timeout`` seconds or
its RSS passes ``rss_limit`` bytes (polled every ``poll_s``), so a run that would exhaust the shared machine's memory is
reported as a failure instead of waking the OOM killer.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

GB = 1e9


@dataclass
class Measured:
    """Outcome of one measured child process."""

    cmd: list[str]
    returncode: int | None
    wall_s: float
    peak_rss_bytes: int
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)
    killed: str | None = None  # "timeout" or "rss_limit" when the watchdog ended it

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed is None

    def failure(self) -> str:
        """One line saying why the run failed (empty when it did not)."""
        if self.killed == "timeout":
            return f"timed out after {self.wall_s:.0f} s"
        if self.killed == "rss_limit":
            return f"killed: RSS passed the limit ({self.peak_rss_bytes / GB:.1f} GB peak)"
        if self.returncode is not None and self.returncode < 0:
            return f"killed by signal {-self.returncode} (out of memory?)"
        if self.returncode != 0:
            lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
            tail = " / ".join(ln.strip() for ln in lines[-2:])[-400:]  # an OmniError is "problem" + "fix" lines
            return f"exit code {self.returncode}: {tail or 'no error output'}"
        return ""

    def last_json(self) -> dict:
        """The last stdout line, parsed as JSON (child processes report that way)."""
        lines = [ln for ln in self.stdout.strip().splitlines() if ln.strip()]
        return json.loads(lines[-1])


from omni_export.build.pipeline import available_memory  # noqa: E402  (MemAvailable, shared with build's pre-flight)


def default_rss_limit(margin_gb: float = 2.0) -> int | None:
    """Available memory now, less a margin: the default RSS limit of a measured child."""
    have = available_memory()
    return None if have is None else max(int(have - margin_gb * GB), int(GB))


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_measured(cmd: list[str], timeout: float | None = None, rss_limit: int | None = None,
                 env: dict | None = None, poll_s: float = 0.1) -> Measured:
    """Run ``cmd``; return its exit code, wall time, peak RSS and output (see module doc)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        killed: list[str] = []
        done = threading.Event()

        def watchdog() -> None:
            while not done.wait(poll_s):
                reason = None
                if timeout is not None and time.perf_counter() - start > timeout:
                    reason = "timeout"
                elif rss_limit is not None and _rss_bytes(proc.pid) > rss_limit:
                    reason = "rss_limit"
                if reason:
                    killed.append(reason)
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # our own child's group, by its id
                    except ProcessLookupError:
                        pass
                    return

        thread = threading.Thread(target=watchdog, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        thread.join()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return Measured(cmd=list(cmd), returncode=proc.returncode, wall_s=wall,
                        peak_rss_bytes=usage.ru_maxrss * 1024, stdout=out.read(), stderr=err.read(),
                        killed=killed[0] if killed else None)


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
    Path(path).write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
