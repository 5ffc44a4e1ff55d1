"""Read and validate a bundle's ``manifest.json`` (bundle format, schema version 1).

``load_manifest`` checks the whole contract of docs/bundle-format.md before anything is run:
schema and version, required keys and their types, safe relative paths, and that every
listed file exists with its listed size. ``verify_file`` checks a file's sha256 before its
first use. ``validate_relpath`` is shared with the compiler's bundle writer.

Whatever ``manifest.json`` holds (invalid UTF-8 or JSON, NaN/Infinity, huge or deeply nested
values, wrong types, out-of-range numbers, unsafe or unencodable paths), the result is a Manifest
or a BundleError naming the file and the fix, never another exception
(tests/test_manifest_fuzz.py feeds it thousands of mutated manifests).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from omni_runtime.errors import BundleError

SCHEMA = "omni-export.bundle"
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"

TENSOR_DTYPES = frozenset(
    {"float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "uint16",
     "int32", "uint32", "int64", "uint64", "bool"}
)
SPECIAL_TOKEN_NAMES = (
    "endoftext", "im_start", "im_end", "audio", "audio_bos", "audio_eos",
    "vision_bos", "vision_eos", "image", "video", "pad",
)

BUILD_FIX = "build one with `omni-export build --model DIR --recipe fp32 --out BUNDLE`"
REBUILD_FIX = "rebuild the bundle with `omni-export build --model DIR --recipe RECIPE --out BUNDLE`"
SCHEMA_FIX = (
    "rebuild the bundle with this omni-export version, "
    "or install the omni-runtime version matching the bundle"
)
COPY_FIX = "rebuild the bundle or copy it again"

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_KINDS = {
    "a string": lambda v: isinstance(v, str),
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "a boolean": lambda v: isinstance(v, bool),
    "an object": lambda v: isinstance(v, dict),
    "a list": lambda v: isinstance(v, list),
    "null, a string or an object": lambda v: v is None or isinstance(v, (str, dict)),
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ONNX name, dtype name (e.g. ``float32``) and shape.

    ``shape`` holds ints for fixed axes and names (``batch``, ``sequence``, ...) for dynamic ones.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class GraphSpec:
    """One entry of the manifest's ``graphs``: its ONNX file, external data files and I/O."""

    name: str
    file: str
    external_data: tuple[str, ...]
    opset: int
    dtype: str
    quantization: str | dict | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def files(self) -> tuple[str, ...]:
        """The graph file followed by its external data files (bundle-relative paths)."""
        return (self.file, *self.external_data)


@dataclass(frozen=True, eq=False)
class Manifest:
    """A validated bundle: its resolved root directory, the raw manifest data and parsed graphs."""

    root: Path
    data: dict = field(repr=False)
    graphs: dict[str, GraphSpec] = field(repr=False)

    @property
    def manifest_path(self) -> Path:
        """Absolute path of ``manifest.json``."""
        return self.root / MANIFEST_NAME

    @property
    def files(self) -> dict[str, dict]:
        """``{relpath: {"bytes": int, "sha256": hex}}`` for every file of the bundle."""
        return self.data["files"]

    @property
    def producer(self) -> dict:
        """``{"name": "omni-export", "version": ...}``."""
        return self.data["producer"]

    @property
    def model(self) -> dict:
        """``{"family": ..., "source": ..., "architectures": [...]}``."""
        return self.data["model"]

    @property
    def recipe(self) -> dict:
        """The recipe the bundle was built with (``name``, ``dtype``, ``quantization``, ...)."""
        return self.data["recipe"]

    @property
    def tokenizer(self) -> dict:
        """``{"file": ..., "chat_template_file": ..., "default_system_prompt": ...}``."""
        return self.data["tokenizer"]

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token name (``im_start``, ``audio``, ``pad``, ...) -> token id."""
        return self.data["special_tokens"]

    @property
    def generation(self) -> dict:
        """Generation defaults: ``eos_token_ids``, ``pad_token_id``, ``do_sample``, ``temperature``, ..."""
        return self.data["generation"]

    @property
    def config(self) -> dict:
        """Config constants per component, e.g. ``config["thinker"]["hidden_size"]``."""
        return self.data["config"]

    def graph(self, name: str) -> GraphSpec:
        """The graph entry called ``name``; BundleError if the bundle has no such graph."""
        if name not in self.graphs:
            raise BundleError(
                f"the bundle has no graph {name!r} (it has: {', '.join(sorted(self.graphs)) or 'none'})",
                path=self.manifest_path,
                fix=REBUILD_FIX,
            )
        return self.graphs[name]

    def path(self, relpath: str) -> Path:
        """Absolute path of a bundle-relative path, after checking it is safe and stays inside."""
        problem = _relpath_problem(relpath)
        path = self.root / relpath if problem is None else None
        if path is not None:
            problem = _resolve_problem(self.root, path)
        if problem is not None:
            raise BundleError(f"unsafe path {_short(relpath)}: {problem}", path=self.manifest_path, fix=REBUILD_FIX)
        return path


def validate_relpath(relpath: str) -> str:
    """Return ``relpath`` unchanged if it is a safe bundle-relative path, else raise BundleError.

    Safe means: a non-empty string, ``/``-separated, not absolute, no drive letter or ``:``,
    no backslash, and no empty, ``.`` or ``..`` part. (Whether it resolves inside the bundle
    through symlinks is checked by ``Manifest.path``, which needs the directory.)
    """
    problem = _relpath_problem(relpath)
    if problem is not None:
        raise BundleError(
            f"unsafe path {relpath!r}: {problem}",
            fix="bundle paths are relative, '/'-separated and stay inside the bundle",
        )
    return relpath


def load_manifest(bundle_dir: str | os.PathLike) -> Manifest:
    """Open the bundle at ``bundle_dir`` and validate its manifest and files (sizes, not hashes).

    Raises BundleError, naming the offending directory, file or manifest key, with a fix.
    """
    given = Path(bundle_dir)
    if not given.exists():
        raise BundleError("bundle directory does not exist", path=given, fix=BUILD_FIX)
    if not given.is_dir():
        raise BundleError("not a directory: a bundle is a directory", path=given, fix=BUILD_FIX)
    root = given.resolve()
    manifest_path = root / MANIFEST_NAME
    if ".partial-" in given.name or ".partial-" in root.name:
        raise BundleError(
            "not a complete bundle (an interrupted build?): this is a temporary build directory",
            path=given,
            fix=REBUILD_FIX,
        )
    if not manifest_path.is_file():
        raise BundleError(
            f"not a complete bundle (an interrupted build?): no {MANIFEST_NAME}", path=given, fix=REBUILD_FIX
        )
    data = _read_json(manifest_path)

    check = _Checker(manifest_path)
    if not isinstance(data, dict):
        raise check.error("the manifest must be a JSON object")
    schema = check.get(data, "schema", "a string", "")
    if schema != SCHEMA:
        raise check.error(f"not an omni-export bundle manifest: schema is {schema!r}, expected {SCHEMA!r}")
    version = data.get("schema_version")
    if not _KINDS["an integer"](version) or version != SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema_version is {version!r} but this runtime reads schema_version {SCHEMA_VERSION}",
            path=manifest_path,
            fix=SCHEMA_FIX,
        )

    graphs = _check_structure(check, data)
    _check_files(check, root, data)
    return Manifest(root=root, data=data, graphs=graphs)


def _read_json(manifest_path: Path) -> object:
    """Parse ``manifest.json`` strictly: UTF-8, standard JSON (no NaN/Infinity), finite numbers,
    integers of at most 4300 digits and nesting Python can handle; BundleError otherwise."""
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BundleError(f"invalid JSON: not UTF-8 ({e.reason})", path=manifest_path, fix=REBUILD_FIX) from e
    except OSError as e:
        raise BundleError(f"cannot read the manifest ({e.strerror or e})", path=manifest_path, fix=COPY_FIX) from e
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise BundleError(
            f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}", path=manifest_path, fix=REBUILD_FIX
        ) from e
    except _NonFinite as e:
        raise BundleError(f"invalid JSON: {e}", path=manifest_path, fix=REBUILD_FIX) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise BundleError(f"invalid JSON: {e}", path=manifest_path, fix=REBUILD_FIX) from None
    except RecursionError:
        raise BundleError("invalid JSON: nested too deeply", path=manifest_path, fix=REBUILD_FIX) from None


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str):
    raise _NonFinite(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(f"the number {text[:40]} is out of range")
    return value


def _short(value: object) -> str:
    """A short rendering of ``value`` for messages: repr for strings, JSON otherwise (never raises)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 80 else repr(value[:60]) + "..."
    try:
        text = json.dumps(value)
    except (ValueError, TypeError, RecursionError):
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def verify_file(manifest: Manifest, relpath: str) -> None:
    """Check the sha256 of a listed bundle file (read in 1 MiB chunks); BundleError if it differs."""
    entry = manifest.files.get(relpath)
    if entry is None:
        raise BundleError(
            f"{relpath!r} is not listed in the manifest's files", path=manifest.manifest_path, fix=REBUILD_FIX
        )
    path = manifest.path(relpath)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError as e:
        raise BundleError("missing file listed in the manifest", path=path, fix=COPY_FIX) from e
    except OSError as e:  # a directory, no permission, an I/O error
        raise BundleError(f"cannot read this file listed in the manifest ({e.strerror or e})", path=path,
                          fix=COPY_FIX) from e
    actual = digest.hexdigest()
    expected = entry["sha256"].lower()
    if actual != expected:
        raise BundleError(
            f"corrupt: sha256 mismatch (manifest says {expected}, file has {actual})", path=path, fix=COPY_FIX
        )


def _relpath_problem(relpath: object) -> str | None:
    """Why ``relpath`` is not a safe bundle-relative path, or None if it is."""
    if not isinstance(relpath, str) or not relpath:
        return "not a non-empty string"
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (an unpaired surrogate)"
    if "\\" in relpath:
        return "contains a backslash (use '/')"
    if "\0" in relpath:
        return "contains a NUL character"
    if relpath.startswith("/"):
        return "is absolute"
    if ":" in relpath:
        return "contains ':' (a drive letter or stream name)"
    parts = relpath.split("/")
    if ".." in parts:
        return "contains a '..' part"
    if "" in parts:
        return "contains an empty part"
    if "." in parts:
        return "contains a '.' part"
    return None


class _Checker:
    """Type checks on the parsed manifest, reporting the JSON path of the offending key."""

    def __init__(self, manifest_path: Path):
        self.manifest_path = manifest_path

    def error(self, problem: str) -> BundleError:
        return BundleError(problem, path=self.manifest_path, fix=REBUILD_FIX)

    def value(self, value: object, kind: str, where: str) -> object:
        if not _KINDS[kind](value):
            raise self.error(f"{where} must be {kind}, not {_short(value)}")
        return value

    def get(self, obj: dict, key: str, kind: str, where: str) -> object:
        where = _join(where, key)
        if key not in obj:
            raise self.error(f"missing key {where} ({kind})")
        return self.value(obj[key], kind, where)

    def relpath(self, value: object, where: str) -> str:
        problem = _relpath_problem(value)
        if problem is not None:
            raise self.error(f"unsafe path {_short(value)} at {where}: {problem}")
        return value

    def minimum(self, obj: dict, key: str, where: str, low: float, *, above: bool = False) -> None:
        """``obj[key]`` (already type-checked) must be >= ``low`` (> ``low`` with ``above``)."""
        value = obj[key]
        if value < low or (above and value == low):
            raise self.error(f"{_join(where, key)} must be {'>' if above else '>='} {low}, not {_short(value)}")

    def int_list(self, obj: dict, key: str, where: str) -> list[int]:
        items = self.get(obj, key, "a list", where)
        for i, item in enumerate(items):
            self.value(item, "an integer", f"{_join(where, key)}[{i}]")
        return items


def _join(where: str, key: str) -> str:
    """JSON path of ``key`` inside ``where``: ``a.b`` for plain keys, ``a["x.onnx"]`` otherwise."""
    if key.isidentifier():
        return f"{where}.{key}" if where else key
    return f"{where}[{json.dumps(key) if len(key) <= 80 else json.dumps(key[:60]) + '...'}]"


def _check_structure(check: _Checker, data: dict) -> dict[str, GraphSpec]:
    """Check required keys and types of the whole manifest; return the parsed graphs."""
    producer = check.get(data, "producer", "an object", "")
    for key in ("name", "version"):
        check.get(producer, key, "a string", "producer")
    model = check.get(data, "model", "an object", "")
    check.get(model, "family", "a string", "model")
    recipe = check.get(data, "recipe", "an object", "")
    check.get(recipe, "name", "a string", "recipe")

    files = check.get(data, "files", "an object", "")
    for relpath, entry in files.items():
        where = _join("files", relpath)
        check.relpath(relpath, where)
        check.value(entry, "an object", where)
        size = check.get(entry, "bytes", "an integer", where)
        if size < 0:
            raise check.error(f"{_join(where, 'bytes')} must not be negative")
        sha = check.get(entry, "sha256", "a string", where)
        if not _SHA256.fullmatch(sha):
            raise check.error(f"{_join(where, 'sha256')} must be 64 hex digits, not {_short(sha)}")

    tokenizer = check.get(data, "tokenizer", "an object", "")
    for key in ("file", "chat_template_file"):
        relpath = check.relpath(check.get(tokenizer, key, "a string", "tokenizer"), f"tokenizer.{key}")
        _listed(check, files, relpath, f"tokenizer.{key}")
    check.get(tokenizer, "default_system_prompt", "a string", "tokenizer")

    special = check.get(data, "special_tokens", "an object", "")
    for name in SPECIAL_TOKEN_NAMES:
        check.get(special, name, "an integer", "special_tokens")
        check.minimum(special, name, "special_tokens", 0)

    generation = check.get(data, "generation", "an object", "")
    for i, token in enumerate(check.int_list(generation, "eos_token_ids", "generation")):
        if token < 0:
            raise check.error(f"generation.eos_token_ids[{i}] must be >= 0, not {token}")
    for key, kind in (("pad_token_id", "an integer"), ("do_sample", "a boolean"), ("temperature", "a number"),
                      ("top_k", "an integer"), ("top_p", "a number"), ("repetition_penalty", "a number"),
                      ("max_new_tokens", "an integer")):
        check.get(generation, key, kind, "generation")
    # The defaults must be usable as they are (the ranges of omni_runtime.stages.sampling.SamplingConfig).
    for key, low, above in (("pad_token_id", 0, False), ("temperature", 0, generation["do_sample"]),
                            ("top_k", 0, False), ("top_p", 0, True), ("repetition_penalty", 0, True),
                            ("max_new_tokens", 1, False)):
        check.minimum(generation, key, "generation", low, above=above)
    if generation["top_p"] > 1:
        raise check.error(f"generation.top_p must be <= 1, not {_short(generation['top_p'])}")

    config = check.get(data, "config", "an object", "")
    thinker = check.get(config, "thinker", "an object", "config")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "max_position_embeddings"):
        check.get(thinker, key, "an integer", "config.thinker")
        check.minimum(thinker, key, "config.thinker", 1)
    for key in ("rms_norm_eps", "rope_theta"):
        check.get(thinker, key, "a number", "config.thinker")
        check.minimum(thinker, key, "config.thinker", 0, above=True)
    kv_dtype = check.get(thinker, "kv_dtype", "a string", "config.thinker")
    if kv_dtype not in TENSOR_DTYPES:
        raise check.error(f"config.thinker.kv_dtype {_short(kv_dtype)} is not one of {', '.join(sorted(TENSOR_DTYPES))}")
    section = check.int_list(thinker, "mrope_section", "config.thinker")
    if len(section) != 3 or any(n < 0 for n in section) or sum(section) * 2 != thinker["head_dim"]:
        raise check.error(f"config.thinker.mrope_section {_short(section)} must be 3 ints >= 0 summing to head_dim/2")

    graphs = check.get(data, "graphs", "an object", "")
    return {name: _graph_spec(check, files, name, entry) for name, entry in graphs.items()}


def _graph_spec(check: _Checker, files: dict, name: str, entry: object) -> GraphSpec:
    """Parse and check one graph entry."""
    where = _join("graphs", name)
    check.value(entry, "an object", where)
    file = check.relpath(check.get(entry, "file", "a string", where), _join(where, "file"))
    _listed(check, files, file, _join(where, "file"))
    external = check.get(entry, "external_data", "a list", where)
    for i, relpath in enumerate(external):
        at = f"{_join(where, 'external_data')}[{i}]"
        _listed(check, files, check.relpath(relpath, at), at)
    io = {}
    for key in ("inputs", "outputs"):
        specs = []
        for i, item in enumerate(check.get(entry, key, "a list", where)):
            specs.append(_tensor_spec(check, item, f"{_join(where, key)}[{i}]"))
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise check.error(f"{_join(where, key)} has duplicate names: {_short(names)}")
        io[key] = tuple(specs)
    opset = check.get(entry, "opset", "an integer", where)
    check.minimum(entry, "opset", where, 1)
    return GraphSpec(
        name=name,
        file=file,
        external_data=tuple(external),
        opset=opset,
        dtype=check.get(entry, "dtype", "a string", where),
        quantization=check.get(entry, "quantization", "null, a string or an object", where),
        inputs=io["inputs"],
        outputs=io["outputs"],
    )


def _tensor_spec(check: _Checker, item: object, where: str) -> TensorSpec:
    """Parse and check one ``{"name", "dtype", "shape"}`` entry."""
    check.value(item, "an object", where)
    name = check.get(item, "name", "a string", where)
    dtype = check.get(item, "dtype", "a string", where)
    if dtype not in TENSOR_DTYPES:
        raise check.error(f"{where}.dtype {dtype!r} is not one of {', '.join(sorted(TENSOR_DTYPES))}")
    shape = check.get(item, "shape", "a list", where)
    for i, dim in enumerate(shape):
        fixed = _KINDS["an integer"](dim) and dim >= 0
        if not (fixed or (isinstance(dim, str) and dim)):
            raise check.error(f"{where}.shape[{i}] must be a non-negative integer or an axis name, not {_short(dim)}")
    return TensorSpec(name=name, dtype=dtype, shape=tuple(shape))


def _listed(check: _Checker, files: dict, relpath: str, where: str) -> None:
    """Reject a referenced path that ``files`` does not list."""
    if relpath not in files:
        raise check.error(f"{where} {_short(relpath)} is not listed in files")


def _resolve_problem(root: Path, path: Path) -> str | None:
    """Why ``path`` (inside ``root`` by its name) is unsafe once resolved, or None."""
    try:
        inside = path.resolve().is_relative_to(root)
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a name the OS rejects
        return f"it cannot be resolved ({getattr(e, 'strerror', None) or e})"
    return None if inside else "it resolves outside the bundle (a symlink?)"


def _check_files(check: _Checker, root: Path, data: dict) -> None:
    """Every listed file stays inside the bundle, exists and has its listed size."""
    for relpath, entry in data["files"].items():
        path = root / relpath
        problem = _resolve_problem(root, path)
        if problem is not None:
            raise check.error(f"unsafe path {_short(relpath)} in files: {problem}")
        try:
            if not path.is_file():
                raise BundleError("missing file listed in the manifest", path=path, fix=COPY_FIX)
            size = path.stat().st_size
        except OSError as e:
            raise BundleError(f"cannot read this file listed in the manifest ({e.strerror or e})", path=path,
                              fix=COPY_FIX) from None
        if size != entry["bytes"]:
            raise BundleError(
                f"wrong size: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced?)",
                path=path,
                fix=COPY_FIX,
            )
