"""Files written atomically: complete under their name, or not there at all.

``write_atomic(path, write)`` calls ``write(tmp)`` on a temporary file in ``path``'s directory
(so the rename stays on one filesystem), gives it the permissions a new file would get (mkstemp
makes it private), then renames it over ``path``; on any error or Ctrl-C the temporary file is
removed and ``path`` is untouched. The WAV files, the JSON results of bench and the benchmark
scripts and the hosts' prompt files are written through it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | Path, write: Callable[[str], None]) -> None:
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.resolve().parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json_atomic(path: str | Path, data, indent: int = 1, default=None) -> None:
    """``data`` as JSON (and a final newline) into ``path``, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, default=default)
            f.write("\n")

    write_atomic(path, write)
