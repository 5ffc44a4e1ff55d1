"""sha256 checks remembered across processes, so a bundle's files are hashed once, not on every run.

Hashing a real 7B bundle's weights takes seconds to minutes; the files do not change between
runs. After a file's sha256 has matched the manifest, ``remember`` records it with the file's
identity as ``os.stat`` reports it: device, inode, size, modification time and status-change time
(``st_ctime_ns``), all in nanoseconds. ``known`` trusts a recorded hash only while every one of
those is unchanged. Any write to the file, a replacement (new inode), a truncation, a ``touch``,
even restoring the old mtime with ``os.utime`` changes ``st_ctime_ns``, which user programs cannot
set; the file is then hashed again. The record is keyed by the file's resolved path and holds the
hash it matched, so a manifest naming another hash hashes again as well.

The records live in one JSON file, ``$OMNI_RUNTIME_CACHE_DIR/verified-sha256.json`` (default
``$XDG_CACHE_HOME/omni-runtime``, else ``~/.cache/omni-runtime``), written atomically (temporary
file, then rename). A missing, unreadable or corrupt cache only means hashing again; concurrent
writers can only lose records. ``OMNI_RUNTIME_CACHE_DIR=off`` turns remembering off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CACHE_FILE = "verified-sha256.json"
MAX_ENTRIES = 4096  # oldest records dropped beyond this


def cache_dir() -> Path | None:
    """The runtime's cache directory (``$OMNI_RUNTIME_CACHE_DIR``, else ``$XDG_CACHE_HOME/omni-runtime``,
    else ``~/.cache/omni-runtime``), or None when caching is turned off (``off``, ``0``, ``none``, empty)."""
    configured = os.environ.get("OMNI_RUNTIME_CACHE_DIR")
    if configured is not None:
        return None if configured.strip().lower() in ("", "0", "off", "none") else Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "omni-runtime"


def cache_path() -> Path | None:
    """The cache file, or None when remembering is turned off."""
    directory = cache_dir()
    return None if directory is None else directory / CACHE_FILE


def _identity(path: Path) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


_parsed: dict = {}  # cache path -> (its stat identity, its records): parsed once while unchanged


def _load(cache: Path) -> dict:
    """The records of ``cache`` (a copy), re-read only when the file changed (another process wrote it)."""
    identity = _identity(cache)
    held = _parsed.get(cache)
    if identity is not None and held is not None and held[0] == identity:
        return dict(held[1])
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    data = data if isinstance(data, dict) else {}
    if identity is not None:
        _parsed[cache] = (identity, data)
    return dict(data)


def known(path: Path, sha256: str) -> bool:
    """True if ``path`` matched ``sha256`` before and has not changed since (module docstring)."""
    cache = cache_path()
    if cache is None:
        return False
    entry = _load(cache).get(str(Path(path).resolve()))
    identity = _identity(path)
    return (isinstance(entry, dict) and identity is not None and entry.get("sha256") == sha256.lower()
            and entry.get("stat") == identity)


def remember(path: Path, sha256: str) -> None:
    """Record that ``path``, as it is now, matched ``sha256``; never raises (a cache is optional)."""
    cache = cache_path()
    identity = _identity(path)
    if cache is None or identity is None:
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        data = _load(cache)
        data.pop(str(Path(path).resolve()), None)
        data[str(Path(path).resolve())] = {"sha256": sha256.lower(), "stat": identity}
        while len(data) > MAX_ENTRIES:
            data.pop(next(iter(data)))
        fd, tmp = tempfile.mkstemp(prefix=f".{CACHE_FILE}.", dir=cache.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, cache)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError:
        pass


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (OSError if it cannot be read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def matches(path: Path, sha256: str) -> bool:
    """True if ``path`` has ``sha256``: remembered (unchanged since it matched), else hashed now
    (and remembered when it matches); False when it differs or cannot be read."""
    if known(path, sha256):
        return True
    try:
        actual = sha256_of(path)
    except OSError:
        return False
    if actual != sha256.lower():
        return False
    remember(path, actual)
    return True
