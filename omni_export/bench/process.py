"""Run one measured child process: its own process group, reaped with ``os.wait4``, with a watchdog.

benchmarks/benchutil.py's ``run_measured`` is this function (it lives in the package so
``omni-export bench`` works from an installed wheel): the
watchdog kills the child's process group when it runs past ``timeout`` seconds or its RSS passes
``rss_limit`` bytes, so a run that would exhaust a shared machine's memory is reported as a
failure instead of waking the OOM killer. The child's peak RSS comes from its own trace (the
tracer resets the kernel's high-water mark per stage, which lowers ``ru_maxrss``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

from omni_export.build.pipeline import available_memory  # MemAvailable, shared with build's pre-flight


@dataclass
class Child:
    cmd: list[str]
    returncode: int | None
    wall_s: float
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)
    killed: str | None = None  # "timeout" or "rss_limit"
    max_rss_seen: int = 0
    #: the kernel's peak RSS of the child (``ru_maxrss``; a child that resets its high-water
    #: mark, as bench's tracer does, lowers it)
    peak_rss_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed is None

    def failure(self) -> str:
        """One line saying why the child failed (empty when it did not)."""
        if self.killed == "timeout":
            return f"timed out after {self.wall_s:.0f} s"
        if self.killed == "rss_limit":
            return f"killed: its RSS passed the limit ({self.max_rss_seen / 1e9:.1f} GB)"
        if self.returncode is not None and self.returncode < 0:
            return f"killed by signal {-self.returncode} (out of memory?)"
        if self.returncode != 0:
            lines = [ln.strip() for ln in self.stderr.strip().splitlines() if ln.strip()]
            return f"exit code {self.returncode}: {' / '.join(lines[-2:])[-500:] or 'no error output'}"
        return ""

    def record(self) -> dict:
        """The child's report: its last stdout line, as JSON (benchmarks/: ``last_json``)."""
        lines = [ln for ln in self.stdout.strip().splitlines() if ln.strip()]
        if not lines:
            raise ValueError("the child printed nothing")
        return json.loads(lines[-1])

    last_json = record


def default_rss_limit(margin_bytes: int = 2_000_000_000) -> int | None:
    """Available memory now, less a margin (at least 1 GB): the default RSS limit of a child."""
    have = available_memory()
    return None if have is None else max(have - margin_bytes, 1_000_000_000)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_child(cmd: list[str], timeout: float | None = None, rss_limit: int | None = None,
              env: dict | None = None, poll_s: float = 0.2) -> Child:
    """Run ``cmd`` to its end (or the watchdog's); its output, exit code and wall time."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        killed: list[str] = []
        seen = [0]
        done = threading.Event()

        def watchdog() -> None:
            while not done.wait(poll_s):
                rss = _rss(proc.pid)
                seen[0] = max(seen[0], rss)
                reason = None
                if timeout is not None and time.perf_counter() - start > timeout:
                    reason = "timeout"
                elif rss_limit is not None and rss > rss_limit:
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
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C in the parent: do not leave the child running
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(proc.pid, 0)
            raise
        finally:
            done.set()
            thread.join()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return Child(cmd=list(cmd), returncode=proc.returncode, wall_s=wall, stdout=out.read(), stderr=err.read(),
                     killed=killed[0] if killed else None, max_rss_seen=seen[0],
                     peak_rss_bytes=usage.ru_maxrss * 1024)
