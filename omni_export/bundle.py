"""Write a bundle directory atomically: files in a temporary sibling, manifest last, then rename.

A build that fails or is interrupted leaves at most a hidden ``.NAME.partial-*`` directory
(removed on a clean failure) and never a directory that looks like a finished bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from omni_runtime.errors import OmniError
from omni_runtime.manifest import MANIFEST_NAME, SCHEMA, SCHEMA_VERSION, validate_relpath

from . import __version__
from .export.onnx_io import ExportedGraph


class BundleWriteError(OmniError):
    """The bundle cannot be written where asked."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class BundleWriter:
    """Collects graphs and files in a temporary directory; ``commit`` publishes the bundle.

    Use as a context manager: leaving the block without ``commit`` (an exception) removes the
    temporary directory.
    """

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out)
        self.force = force
        if self.out.exists() and not force:
            raise BundleWriteError("output already exists", path=self.out,
                                   fix="choose another --out, or pass --force to replace it")
        if self.out.exists() and not (self.out / MANIFEST_NAME).is_file() and any(self.out.iterdir()):
            raise BundleWriteError("output exists and is not a bundle; refusing to replace it", path=self.out,
                                   fix="choose another --out or remove that directory yourself")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir: Path | None = None
        self.graphs: dict[str, dict] = {}

    def __enter__(self) -> "BundleWriter":
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.dir is not None and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    def add_graph(self, name: str, graph: ExportedGraph, dtype: str, quantization: dict | None = None) -> None:
        self.graphs[name] = {
            "file": graph.file,
            "external_data": list(graph.external_data),
            "opset": graph.opset,
            "dtype": dtype,
            "quantization": quantization,
            "inputs": [t.to_json() for t in graph.inputs],
            "outputs": [t.to_json() for t in graph.outputs],
        }

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
        """Hash every file, write the manifest last and move the bundle into place."""
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
        tmp = self.dir / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.dir / MANIFEST_NAME)
        self.dir.chmod(0o755)  # mkdtemp makes it private; a bundle is an ordinary directory
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.dir, self.out)
        self.dir = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out
