"""Optimized copies of a bundle's graphs, written at the first load and read by later loads.

onnxruntime optimizes a graph every time a session is created from it (fusions such as
DequantizeLinear + MatMul -> MatMulNBits, constant folding, layout changes). The first load
of a graph also saves the optimized graph (``SessionOptions.optimized_model_filepath``) into
``$OMNI_RUNTIME_CACHE_DIR/optimized/<key>/`` with its initializers in one external file; later
loads create the session from that copy with graph optimizations disabled.

The key is the sha256 of everything the optimized graph depends on: the sha256 of the graph's
files (from the manifest), the onnxruntime version, the providers and their options, the
optimization level, the session config entries, and the machine (CPU architecture and feature
flags: level ``all`` may pick layouts for this CPU's vector width). Any change gives another key,
so a stale copy is never read.

A copy is written into a temporary directory and renamed into place with its ``meta.json``
(the key, the sha256 of each file it holds, the source graph) written last. Before a copy is used
its files are checked against those hashes (remembered across processes like the bundle's,
``omni_runtime.bundle.hash_cache``); a copy that is incomplete, corrupt or cannot be loaded is
deleted and rebuilt from the bundle, never trusted. When a new copy is written, older copies of
the same graph file under the same settings are deleted (a rebuilt bundle, a new onnxruntime):
one copy per graph file and settings; so are copies whose graph file no longer exists (a deleted
bundle), which would otherwise fill the disk with copies nothing can read. ``OMNI_RUNTIME_OPTIMIZED_COPIES=off`` turns copies off (the
sha256 records stay), ``OMNI_RUNTIME_CACHE_DIR=off`` both.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from omni_runtime.bundle import hash_cache

DIRECTORY = "optimized"
MODEL = "model.onnx"
DATA = "model.onnx.data"
META = "meta.json"
FORMAT = 1
#: initializers at least this big go to the external data file (small ones stay in the graph)
EXTERNAL_MIN_BYTES = 1024


def enabled() -> bool:
    """False when ``OMNI_RUNTIME_OPTIMIZED_COPIES`` is ``off`` (or ``0``, ``no``, ``false``): the
    sha256 records stay on, only the copies are off."""
    return os.environ.get("OMNI_RUNTIME_OPTIMIZED_COPIES", "on").strip().lower() not in ("0", "off", "no", "false")


def root() -> Path | None:
    """Where copies live, or None when caching is off."""
    base = hash_cache.cache_dir()
    return None if base is None else base / DIRECTORY


def machine() -> dict:
    """What of this machine the optimized graph may depend on."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return {"machine": platform.machine(), "system": platform.system(),
            "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()}


def copy_key(inputs: dict) -> str:
    """The key of a copy: sha256 of ``inputs`` (JSON, sorted keys) and this machine."""
    body = json.dumps({"format": FORMAT, "machine": machine(), **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class Copy:
    """A copy's directory and files."""

    directory: Path

    @property
    def model(self) -> Path:
        return self.directory / MODEL

    @property
    def meta(self) -> Path:
        return self.directory / META


def find(key: str) -> Copy | None:
    """The valid copy for ``key``, or None (an invalid one is deleted)."""
    base = root()
    if base is None:
        return None
    copy = Copy(base / key)
    if not copy.directory.is_dir():
        return None
    try:
        meta = json.loads(copy.meta.read_text(encoding="utf-8"))
        files = meta["files"]
        ok = (meta.get("key") == key and meta.get("format") == FORMAT and isinstance(files, dict)
              and MODEL in files and all(isinstance(v, str) for v in files.values())
              and set(os.listdir(copy.directory)) == {*files, META})
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if ok:
        ok = all(hash_cache.matches(copy.directory / name, sha) for name, sha in files.items())
    if not ok:
        discard(copy)
        return None
    return copy


def start(key: str) -> Path | None:
    """A new temporary directory to write the copy of ``key`` into (None when caching is off or
    the cache directory cannot be written)."""
    base = root()
    if base is None:
        return None
    try:
        base.mkdir(parents=True, exist_ok=True)
        _drop_abandoned(base)
        return Path(tempfile.mkdtemp(prefix=f".{key}.", dir=base))
    except OSError:
        return None


def _drop_abandoned(base: Path, age: float = 6 * 3600) -> None:
    """Delete staging directories a killed process left (older than ``age`` seconds)."""
    now = time.time()
    for entry in base.iterdir():
        try:
            if entry.name.startswith(".") and entry.is_dir() and now - entry.stat().st_mtime > age:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def commit(key: str, staging: Path, source: str) -> Copy | None:
    """Turn ``staging`` (holding ``MODEL`` and maybe ``DATA``) into the copy of ``key``: hash its
    files, write ``meta.json`` last, rename into place, delete older copies of ``source``.
    Never raises: a copy is optional (None if it could not be written)."""
    base = staging.parent
    final = Copy(base / key)
    try:
        files = {}
        for name in sorted(os.listdir(staging)):
            files[name] = hash_cache.sha256_of(staging / name)
        if MODEL not in files:
            raise OSError("onnxruntime wrote no optimized model")
        meta = {"format": FORMAT, "key": key, "source": source, "files": files}
        (staging / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if final.directory.exists():
            shutil.rmtree(final.directory, ignore_errors=True)
        os.replace(staging, final.directory)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        return find(key)  # another process may have won the race
    for name, sha in files.items():
        hash_cache.remember(final.directory / name, sha)
    _drop_older(base, key, source)
    return final


def discard(copy: Copy | Path) -> None:
    """Delete a copy (or a staging directory); never raises."""
    directory = copy.directory if isinstance(copy, Copy) else copy
    shutil.rmtree(directory, ignore_errors=True)


def _drop_older(base: Path, key: str, source: str) -> None:
    """Delete other copies made from the same source graph (a rebuilt bundle, a new onnxruntime),
    and copies of graph files that are gone (``source`` is ``"<graph path>|<settings key>"``)."""
    try:
        entries = list(base.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name == key or entry.name.startswith("."):
            continue
        try:
            meta = json.loads((entry / META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        other = meta.get("source") if isinstance(meta, dict) else None
        if isinstance(other, str) and (other == source or not os.path.exists(other.split("|", 1)[0])):
            shutil.rmtree(entry, ignore_errors=True)
