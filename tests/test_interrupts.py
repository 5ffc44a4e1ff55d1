"""SIGINT/SIGTERM during ``build`` and ``tiny`` leave nothing behind; partial directories of
killed processes are removed by the next run (or named in a warning when their owner lives).

The commands run as real subprocesses and are signalled while their ``.NAME.partial-PID-*``
directory exists.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from omni_export.build.bundle_writer import BundleWriter, StalePartialWarning, check_output

from conftest import run_cli


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "omni_export.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for_partial(parent: Path, proc: subprocess.Popen, timeout: float = 180) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in parent.iterdir() if ".partial-" in p.name]
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"the command ended before writing anything: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no partial directory appeared")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc.kill()
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("command", ["build", "tiny"])
def test_signal_leaves_nothing_behind(command, signum, tmp_path, tiny_checkpoint):
    out = tmp_path / "new" / "out[x]"  # a parent that the command has to create
    if command == "build":
        proc = start("build", "--model", tiny_checkpoint, "--out", out)
    else:
        proc = start("tiny", out)
    assert _wait_parent(out.parent, proc)
    partial = wait_for_partial(out.parent, proc)
    assert partial.name.startswith(f".out[x].partial-{proc.pid}-")
    time.sleep(0.3)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    assert f"interrupted by {signal.Signals(signum).name}" in stderr
    assert "Traceback" not in stderr + stdout
    assert list(tmp_path.iterdir()) == [], sorted(p.name for p in tmp_path.rglob("*"))


def _wait_parent(parent: Path, proc: subprocess.Popen, timeout: float = 180) -> bool:
    deadline = time.monotonic() + timeout
    while not parent.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_partial_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "m[bold]"
    proc = start("tiny", out)
    partial = wait_for_partial(tmp_path, proc)
    proc.kill()  # SIGKILL cannot be handled: the partial directory stays
    proc.wait()
    assert partial.exists()
    legacy = tmp_path / ".m[bold].partial-1a2b3c"  # an old name without a pid: only named
    legacy.mkdir()
    live = tmp_path / f".m[bold].partial-{os.getpid()}-busy"  # a running process's: only named
    live.mkdir()
    done = run_cli("tiny", out)
    assert done.returncode == 0, done.stderr
    assert not partial.exists()
    assert f"warning: removed {partial}" in done.stderr
    assert f"warning: {legacy}" in done.stderr and legacy.exists()
    assert f"warning: {live} belongs to running process {os.getpid()}" in done.stderr and live.exists()
    assert (out / "config.json").is_file()


def test_bundle_writer_cleans_stale_partials_and_its_own(tmp_path):
    stale = tmp_path / f".b.partial-{dead_pid()}-abcd"
    stale.mkdir()
    (stale / "thinker_decoder.onnx").write_text("half")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BundleWriter(tmp_path / "deep" / "er" / "b")  # another name: not its partial, no warning
    assert stale.exists()
    with pytest.warns(StalePartialWarning, match="removed"):
        writer = BundleWriter(tmp_path / "b")
    assert not stale.exists()
    with pytest.raises(RuntimeError):
        with writer:
            assert writer.dir.name.startswith(f".b.partial-{os.getpid()}-")
            raise RuntimeError("failed export")
    assert list(tmp_path.iterdir()) == []
    nested = BundleWriter(tmp_path / "x" / "y" / "b")
    with pytest.raises(RuntimeError):
        with nested:
            assert nested.dir.parent == tmp_path / "x" / "y"
            raise RuntimeError("failed export")
    assert list(tmp_path.iterdir()) == []  # the parents it created are gone too


def test_check_output_writes_nothing(tmp_path):
    check_output(tmp_path / "a" / "b" / "bundle")
    check_output(tmp_path / "ckpt", kind="checkpoint")
    assert list(tmp_path.iterdir()) == []


def test_signal_during_a_deferred_block_is_handled_after_it():
    """The renames that publish a result are never cut in half by a signal."""
    code = (
        "import os, signal, time\n"
        "from omni_export.build.bundle_writer import exit_on_signals, signals_deferred\n"
        "with exit_on_signals(lambda name: print('handled', name, flush=True)):\n"
        "    with signals_deferred():\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.2)\n"
        "        print('block finished', flush=True)\n"
        "    print('not reached', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stdout.splitlines() == ["block finished", "handled SIGTERM"]
