"""Write a bundle directory atomically: files in a temporary sibling, manifest last, then rename.

A build that fails or is interrupted leaves at most a hidden ``.NAME.partial-PID-*`` directory
(removed on a clean failure, and on SIGINT/SIGTERM/SIGHUP when the command line's
:func:`exit_on_signals` is active) and never a directory that looks like a finished bundle. A
partial directory left by a killed process (SIGKILL, power loss) is removed by the next build
into the same place once its process ``PID`` is gone, or named in a :class:`StalePartialWarning`.

Output paths are checked before any work (:func:`check_output`): a file where a directory
should go, a missing ``--force``, a non-bundle directory or an unwritable parent are errors.
This module imports nothing heavy (no torch), so the command line can check early.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from omni_runtime.errors import BundleError, OmniError
from omni_runtime.bundle.manifest import MANIFEST_NAME, SCHEMA, SCHEMA_VERSION, validate_manifest, validate_relpath

from omni_export import __version__

if TYPE_CHECKING:  # pragma: no cover
    from omni_export.export.onnx_io import ExportedGraph

PARTIAL = "partial"


class OutputPathError(OmniError):
    """An output path (``--out``, ``tiny OUT``) cannot be used."""


class BundleWriteError(OutputPathError):
    """The bundle cannot be written where asked."""


class StalePartialWarning(UserWarning):
    """A temporary directory of an interrupted build was found (and removed, or left in place)."""


_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

# Temporary directories being written (the writers register them), with the parent directories
# created for them: what the signal handler of exit_on_signals removes before the process exits.
_TEMPORARIES: dict[Path, list[Path]] = {}
# signals_deferred nesting depth, and signals that arrived meanwhile (handled when it ends).
_DEFERRED = 0
_PENDING: list[int] = []


def track_temporary(path: Path, made: list[Path] | None = None) -> None:
    _TEMPORARIES[Path(path)] = list(made or [])


def untrack_temporary(path: Path) -> None:
    _TEMPORARIES.pop(Path(path), None)


def remove_temporaries() -> None:
    """Remove every tracked temporary directory (and the parents made for it)."""
    for path, made in list(_TEMPORARIES.items()):
        shutil.rmtree(path, ignore_errors=True)
        remove_created(made)
        _TEMPORARIES.pop(path, None)


@contextlib.contextmanager
def exit_on_signals(on_signal: Callable[[str], None] | None = None) -> Iterator[None]:
    """While the block runs, SIGINT, SIGTERM and SIGHUP remove the tracked temporary directories,
    call ``on_signal(signal name)`` (to say so) and exit the process with code 128 + signal number.

    The handler exits rather than raising: an exception raised at an arbitrary point (in the
    import of a C extension, say) can be swallowed or turned into another error by the code it
    lands in. The renames that publish a result run with the signals held
    (:func:`signals_deferred`), so the handler finds either the temporary directory or the
    finished output. Main thread only (elsewhere the block runs unchanged).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _DEFERRED:
            _PENDING.append(signum)
            return
        with contextlib.suppress(Exception):
            signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # no second signal during the cleanup
        remove_temporaries()
        if on_signal is not None:
            with contextlib.suppress(Exception):
                on_signal(signal.Signals(signum).name)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while the block runs (renames that publish a result, cleanups):
    a signal that arrives meanwhile is handled when the block ends.

    Two layers: the main thread's signal mask (for Python's default SIGINT handler), and a flag
    the :func:`exit_on_signals` handler checks, since another thread may take the signal.
    """
    global _DEFERRED
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _DEFERRED += 1
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS) if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        _DEFERRED -= 1
        if not _DEFERRED and _PENDING:
            signum = _PENDING[0]
            _PENDING.clear()
            handler = signal.getsignal(signum)
            if callable(handler):
                handler(signum, None)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- output paths


def partial_prefix(out: str | os.PathLike) -> str:
    """Name prefix of this process's temporary directories for ``out``: ``.NAME.partial-PID-``."""
    return f".{_absolute(out).name}.{PARTIAL}-{os.getpid()}-"


def _absolute(out: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.fspath(out)))


def check_output(out: str | os.PathLike, *, force: bool = False, flag: str = "--out", kind: str = "bundle") -> None:
    """Check, without writing anything, that ``out`` can be created (or replaced).

    ``kind="bundle"``: ``out`` must not exist, or with ``force`` be an existing bundle (or an
    empty directory) to replace. ``kind="checkpoint"`` (``tiny``): ``out`` must not exist or be
    an empty directory. In both cases the nearest existing parent must be a writable directory.
    ``flag`` names the option in the fixes. Raises :class:`OutputPathError` (BundleWriteError
    for bundles).
    """
    error = BundleWriteError if kind == "bundle" else OutputPathError
    given, path = Path(out), _absolute(out)
    if path.name in ("", ".", ".."):
        raise error("not a usable output directory name", path=given, fix=f"pass a new directory as {flag}")
    if path.is_symlink() and not path.exists():
        raise error("is a broken symbolic link", path=given, fix=f"remove the link or choose another {flag}")
    if path.exists():
        if not path.is_dir():
            raise error("exists and is a file, not a directory", path=given,
                        fix=f"choose another {flag}, or remove the file first")
        try:
            empty = not any(path.iterdir())
        except OSError as exc:
            raise error(f"cannot read this directory ({exc.strerror})", path=given,
                        fix=f"choose another {flag}") from None
        if kind == "bundle":
            if not force:
                raise error("output already exists", path=given,
                            fix=f"choose another {flag}, or pass --force to replace it")
            if not empty and not (path / MANIFEST_NAME).is_file():
                raise error("output exists and is not a bundle; refusing to replace it", path=given,
                            fix=f"choose another {flag} or remove that directory yourself")
        elif not empty:
            raise error("already exists and is not empty", path=given,
                        fix=f"choose a new directory as {flag}, or remove it first")
    _check_parent_writable(path, given, error, flag)


def _check_parent_writable(path: Path, given: Path, error: type[OmniError], flag: str) -> None:
    """The nearest existing ancestor of ``path`` is a directory where we can create entries."""
    ancestor = path.parent
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise error(f"cannot be created: {ancestor} is a file, not a directory", path=given,
                    fix=f"choose another {flag}")
    # A real probe (os.access says yes to root even on read-only or virtual file systems).
    try:
        probe = tempfile.mkdtemp(prefix=f".omni-export-probe-{os.getpid()}-", dir=ancestor)
    except OSError as exc:
        raise error(f"cannot be created: no write access to {ancestor} ({exc.strerror})", path=given,
                    fix=f"choose a {flag} in a directory you can write to") from None
    os.rmdir(probe)


def make_parents(directory: Path) -> list[Path]:
    """``mkdir -p directory``; returns the directories created, outermost first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    created = []
    for path in reversed(missing):
        path.mkdir()
        created.append(path)
    return created


def remove_created(created: list[Path]) -> None:
    """Remove directories made by :func:`make_parents` (innermost first) while they are empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            break


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (dead but not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError, OSError):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def clean_stale_partials(out: str | os.PathLike) -> list[Path]:
    """Remove ``.NAME.partial-PID-*`` directories beside ``out`` whose process PID is gone.

    Others (their process is running, or an old name without a PID) are left alone and named in
    a :class:`StalePartialWarning`; removals are reported the same way. Returns the removed paths.
    """
    path = _absolute(out)
    prefix = f".{path.name}.{PARTIAL}-"
    try:
        entries = sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = re.fullmatch(r"(\d+)-.*", entry.name[len(prefix):], flags=re.S)
        pid = int(match.group(1)) if match else None
        if pid is None:
            warnings.warn(StalePartialWarning(
                f"{entry} is a temporary directory of an interrupted run (no owner recorded); "
                f"remove it if no build is writing {path.name}"), stacklevel=2)
        elif pid == os.getpid() or _process_alive(pid):
            warnings.warn(StalePartialWarning(
                f"{entry} belongs to running process {pid} (another build into {path.name}?); left in place"),
                stacklevel=2)
        else:
            with signals_deferred():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()
            if entry.exists() or entry.is_symlink():
                warnings.warn(StalePartialWarning(
                    f"{entry} was left by process {pid}, which is gone, but could not be removed; remove it"),
                    stacklevel=2)
            else:
                removed.append(entry)
                warnings.warn(StalePartialWarning(
                    f"removed {entry}, left by an interrupted run (process {pid} is gone)"), stacklevel=2)
    return removed


# ----------------------------------------------------------------------------- the writer


class BundleWriter:
    """Collects graphs and files in a temporary directory; ``commit`` publishes the bundle.

    Construction checks ``out`` (:func:`check_output`) and writes nothing. Use as a context
    manager: entering creates ``.NAME.partial-PID-*`` beside ``out`` (and any missing parent
    directories); leaving the block without ``commit`` (an exception) removes all of it, as does
    a signal under :func:`exit_on_signals`.
    """

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out)
        self.force = force
        check_output(self.out, force=force)
        self._abs = _absolute(self.out)
        clean_stale_partials(self.out)
        self.dir: Path | None = None
        self._made: list[Path] = []
        self.graphs: dict[str, dict] = {}

    def __enter__(self) -> "BundleWriter":
        self._made = make_parents(self._abs.parent)
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=partial_prefix(self.out), dir=self._abs.parent))
        except BaseException:
            remove_created(self._made)
            raise
        track_temporary(self.dir, self._made)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with signals_deferred():
            if self.dir is not None and self.dir.exists():
                shutil.rmtree(self.dir, ignore_errors=True)
                untrack_temporary(self.dir)
                self.dir = None
                remove_created(self._made)

    def add_graph(self, name: str, graph: ExportedGraph, dtype: str, quantization: dict | None = None,
                  session_config: dict[str, str] | None = None) -> None:
        self.graphs[name] = {
            "file": graph.file,
            "external_data": list(graph.external_data),
            "opset": graph.opset,
            "dtype": dtype,
            "quantization": quantization,
            "inputs": [t.to_json() for t in graph.inputs],
            "outputs": [t.to_json() for t in graph.outputs],
        }
        if session_config:
            self.graphs[name]["session_config"] = dict(session_config)

    def write_text(self, relpath: str, text: str) -> None:
        path = self.dir / validate_relpath(relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    def copy_file(self, source: Path, relpath: str) -> None:
        path = self.dir / validate_relpath(relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def _files(self) -> dict[str, dict]:
        files = {}
        for path in sorted(p for p in self.dir.rglob("*") if p.is_file()):
            rel = path.relative_to(self.dir).as_posix()
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        return files

    def commit(self, manifest: dict) -> Path:
        """Hash every file, validate the manifest (``omni_runtime.bundle.manifest.validate_manifest``:
        the schema, the checks beyond it, the config blocks against the graphs' IO), write it last
        and move the bundle into place."""
        body = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "producer": {"name": "omni-export", "version": __version__},
            **manifest,
            "graphs": self.graphs,
            "files": self._files(),
        }
        for graph in self.graphs.values():
            for rel in [graph["file"], *graph["external_data"]]:
                if rel not in body["files"]:
                    raise BundleWriteError(f"graph file {rel} was not written", path=self.dir / rel,
                                           fix="this is a bug in omni-export: please report it")
        try:  # the runtime's contract: manifest.schema.json and the checks load_manifest runs beyond it
            text = json.dumps(body, indent=2, allow_nan=False) + "\n"
            validate_manifest(json.loads(text))
        except (ValueError, BundleError) as exc:  # ValueError: NaN or Infinity, which JSON does not have
            raise BundleWriteError(f"the manifest omni-export made is invalid: {getattr(exc, 'problem', exc)}",
                                   path=self.dir / MANIFEST_NAME,
                                   fix="this is a bug in omni-export: please report it") from None
        tmp = self.dir / (MANIFEST_NAME + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.dir / MANIFEST_NAME)
        self.dir.chmod(0o755)  # mkdtemp makes it private; a bundle is an ordinary directory
        with signals_deferred():  # the two renames go together
            old = None
            try:
                if self.out.exists():
                    old = self._abs.with_name(f".{self._abs.name}.old-{os.getpid()}")
                    os.replace(self.out, old)
                os.replace(self.dir, self.out)
                untrack_temporary(self.dir)
                if old is not None:
                    track_temporary(old)
            except OSError as exc:
                if old is not None and not self.out.exists():
                    os.replace(old, self.out)
                raise BundleWriteError(f"cannot move the new bundle into place ({exc.strerror})", path=self.out,
                                       fix="check that nothing else writes this directory, then build again") from None
            self.dir = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            untrack_temporary(old)
        return self.out
