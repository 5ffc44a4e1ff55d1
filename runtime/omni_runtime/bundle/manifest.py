"""Read and validate a bundle's ``manifest.json`` (bundle format, schema version 2).

The contract is ``manifest.schema.json`` beside this module (JSON Schema draft 2020-12, the
file other-language hosts validate with). ``load_manifest`` checks, before anything is run:

1. the JSON itself (UTF-8, standard JSON, finite numbers), the ``schema`` and its version;
2. the schema, with the ``jsonschema`` library (one validator, built on first use); the first
   violation (``jsonschema``'s best match) becomes a BundleError naming the JSON path
   (``config.thinker.hidden_size``), the value and the fix;
3. what a schema cannot say: unpaired surrogates in paths, referenced files listed in ``files``,
   unique graph IO names, ``mrope_section`` sums, min <= max pairs, the default speaker;
4. that every config block agrees with its graphs' IO (KV inputs per layer, KV heads and width,
   hidden and vocabulary widths) and with the thinker's width: a mismatch names both sides;
5. that every listed file stays inside the bundle, exists and has its listed size.

The blocks are then parsed once into typed frozen objects, ``manifest.configs``
(``omni_runtime.bundle.config``), which the stages take as they are. ``verify_file`` checks a
file's sha256 before its first use. ``validate_relpath`` is shared with the compiler's bundle
writer, which also runs ``validate_manifest`` (steps 1-4) on every manifest it writes.

Whatever ``manifest.json`` holds (invalid UTF-8 or JSON, NaN/Infinity, huge or deeply nested
values, wrong types, out-of-range numbers, unsafe or unencodable paths), the result is a Manifest
or a BundleError naming the file and the fix, never another exception
(tests/test_manifest_fuzz.py feeds it thousands of mutated manifests).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from omni_runtime.bundle import names
from omni_runtime.bundle.config import Configs, DecoderConfig, parse_configs
from omni_runtime.bundle import hash_cache
from omni_runtime.errors import BundleError

SCHEMA = "omni-export.bundle"
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
#: the manifest's JSON Schema, shipped in the package
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")

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
    quantization: dict | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: onnxruntime session config entries the graph needs (``SessionOptions.add_session_config_entry``);
    #: {} when the manifest has none (bundles of earlier builds)
    session_config: dict[str, str] = field(default_factory=dict)

    @property
    def files(self) -> tuple[str, ...]:
        """The graph file followed by its external data files (bundle-relative paths)."""
        return (self.file, *self.external_data)

    def tensor(self, io: str, name: str) -> TensorSpec | None:
        """The input (``io="inputs"``) or output (``"outputs"``) called ``name``, or None."""
        return next((t for t in getattr(self, io) if t.name == name), None)


@dataclass(frozen=True, eq=False)
class Manifest:
    """A validated bundle: its resolved root directory, the raw manifest data and parsed graphs.

    ``configs`` holds every block typed (``omni_runtime.bundle.config.Configs``), parsed from
    ``data`` when the Manifest is made; ``config`` and the other dict properties are the raw data.
    """

    root: Path
    data: dict = field(repr=False)
    graphs: dict[str, GraphSpec] = field(repr=False)
    configs: Configs = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "configs", parse_configs(self.data))

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
    def target(self) -> str:
        """The device the bundle was built for: ``cpu`` or ``cuda`` (``omni-export build --target``);
        ``cpu`` for bundles of earlier builds, which do not record it."""
        return self.data.get("target", "cpu")

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
    graphs = _check_content(data, manifest_path)
    manifest = Manifest(root=root, data=data, graphs=graphs)
    _check_graph_io(manifest.configs, graphs, manifest_path)
    _check_files(root, data, manifest_path)
    return manifest


def validate_manifest(data: object, path: str | os.PathLike | None = None) -> None:
    """Check manifest ``data`` (parsed JSON) as ``load_manifest`` does, but not the files on disk:
    the schema, the checks beyond it and the agreement of the config blocks with the graphs' IO.
    BundleError naming ``path`` (the manifest's file, if any), the JSON path, the value and a fix."""
    graphs = _check_content(data, path)
    _check_graph_io(parse_configs(data), graphs, path)


@functools.cache
def manifest_schema() -> dict:
    """The manifest's JSON Schema (draft 2020-12, ``SCHEMA_PATH``); shared: do not modify it."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@functools.cache
def _validator():
    """The schema's validator, built once. Integers are strict: 2.0 is not an integer here (JSON
    Schema would accept it; the compiler never writes one and hosts read counts as integers)."""
    from jsonschema import Draft202012Validator, validators

    strict = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
    return validators.extend(Draft202012Validator, type_checker=strict)(_inline(manifest_schema()))


def _inline(node, defs: dict | None = None):
    """A copy of the schema with every ``{"$ref": "#/$defs/x", ...}`` replaced by definition x (merged
    with its sibling keywords): the same validation, faster (no reference lookups)."""
    defs = node["$defs"] if defs is None else defs
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _inline(value, defs) for key, value in node.items() if key not in ("$ref", "$defs")}
    if "$ref" in node:
        out = {**_inline(defs[node["$ref"].rsplit("/", 1)[-1]], defs), **out}
    return out


def schema_problem(data: object) -> str | None:
    """The first violation of the schema by ``data`` as a message naming its JSON path and value
    (``jsonschema``'s best match), or None when ``data`` is valid."""
    from jsonschema.exceptions import best_match

    try:
        error = best_match(_validator().iter_errors(data))
    except RecursionError:
        return "the manifest is nested too deeply to validate"
    return None if error is None else _describe(error)


_TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "a boolean",
               "object": "an object", "array": "a list", "null": "null"}
_BOUNDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}


def _describe(error) -> str:
    """A jsonschema ValidationError as ``<JSON path> must be <what>, not <value>`` (or close)."""
    where = ""
    for part in error.absolute_path:
        where = f"{where}[{part}]" if isinstance(part, int) else _join(where, part)
    value, kind, schema = error.instance, error.validator, error.schema
    if "propertyNames" in error.absolute_schema_path:  # the instance is a key of the object at ``where``
        if value == "":
            return f"{where} has an empty key"
        where = _join(where, value)
    if kind == "required":
        missing = next(key for key in error.validator_value if key not in value)
        what = _expected(schema.get("properties", {}).get(missing)) or schema.get("description")
        return f"missing key {_join(where, missing)}" + (f" ({what})" if what else "")
    where = where or "the manifest"
    if kind == "type":
        return f"{where} must be {_expected(schema)}, not {_short(value)}"
    if kind in _BOUNDS:
        when = f" {schema['description']}" if "then" in error.absolute_schema_path and "description" in schema else ""
        return f"{where} must be {_BOUNDS[kind]} {error.validator_value}{when}, not {_short(value)}"
    if kind in ("enum", "const"):
        return f"{where} {_short(value)} is not {_expected({kind: error.validator_value})}"
    if kind == "pattern" and schema.get("title") == "bundle-relative path":
        return f"unsafe path {_short(value)} at {where}: {_relpath_problem(value) or 'not a safe bundle path'}"
    if kind == "pattern" and schema.get("title") == "sha256":
        return f"{where} must be 64 hex digits, not {_short(value)}"
    if kind in ("minItems", "maxItems"):
        bound = "at least" if kind == "minItems" else "at most"
        return f"{where} must have {bound} {error.validator_value} items, not {_short(value)}"
    if kind in ("minLength", "minProperties"):
        return f"{where} must not be empty"
    return f"{where}: {_short(value)} is invalid ({error.message[:200]})"


def _expected(schema: dict | None) -> str | None:
    """What ``schema`` (a property's subschema, its ``$ref`` followed) accepts, in words."""
    defs = manifest_schema()["$defs"]
    while isinstance(schema, dict) and "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    if not isinstance(schema, dict):
        return None
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        return " or ".join(_TYPE_NAMES[t] for t in types)
    if "const" in schema:
        return _short(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    return None


def _error(path, problem: str) -> BundleError:
    return BundleError(problem, path=path, fix=REBUILD_FIX)


def _check_content(data: object, path) -> dict[str, GraphSpec]:
    """Steps 1-3 of the module docstring on parsed ``data``; returns the parsed graphs."""
    if not isinstance(data, dict):
        raise _error(path, "the manifest must be a JSON object")
    if data.get("schema") != SCHEMA:
        raise _error(path, f"not an omni-export bundle manifest: schema is {_short(data.get('schema', ''))}, "
                           f"expected {SCHEMA!r}")
    version = data.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise BundleError(f"bundle schema_version is {version!r} but this runtime reads schema_version "
                          f"{SCHEMA_VERSION}", path=path, fix=SCHEMA_FIX)
    problem = schema_problem(data)
    if problem is not None:
        raise _error(path, problem)
    files = data["files"]

    def relpath(value: str, where: str, listed: bool = True) -> str:
        problem = _relpath_problem(value)  # the schema's pattern leaves only unpaired surrogates
        if problem is not None:
            raise _error(path, f"unsafe path {_short(value)} at {where}: {problem}")
        if listed and value not in files:
            raise _error(path, f"{where} {_short(value)} is not listed in files")
        return value

    for rel in files:
        relpath(rel, _join("files", rel), listed=False)
    for key in ("file", "chat_template_file"):
        relpath(data["tokenizer"][key], f"tokenizer.{key}")
    graphs = {}
    for name, entry in data["graphs"].items():
        where = _join("graphs", name)
        relpath(entry["file"], _join(where, "file"))
        for i, rel in enumerate(entry["external_data"]):
            relpath(rel, f"{_join(where, 'external_data')}[{i}]")
        io = {}
        for key in ("inputs", "outputs"):
            io[key] = tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in entry[key])
            seen = [t.name for t in io[key]]
            if len(set(seen)) != len(seen):
                raise _error(path, f"{_join(where, key)} has duplicate names: {_short(seen)}")
        graphs[name] = GraphSpec(name=name, file=entry["file"], external_data=tuple(entry["external_data"]),
                                 opset=entry["opset"], dtype=entry["dtype"], quantization=entry["quantization"],
                                 inputs=io["inputs"], outputs=io["outputs"],
                                 session_config=dict(entry.get("session_config") or {}))
    config = data["config"]
    for block in ("thinker", "talker"):
        cfg = config.get(block)
        if cfg is not None and sum(cfg["mrope_section"]) * 2 != cfg["head_dim"]:
            raise _error(path, f"config.{block}.mrope_section {_short(cfg['mrope_section'])} must sum to "
                               f"config.{block}.head_dim/2 = {cfg['head_dim'] / 2:g}")
    vision = config.get("vision")
    if vision is not None:
        for where, low, high in (("image", "min_pixels", "max_pixels"), ("video", "min_frames", "max_frames"),
                                 ("video", "min_tokens", "max_tokens")):
            if vision[where][low] > vision[where][high]:
                raise _error(path, f"config.vision.{where}.{low} {vision[where][low]} must be <= "
                                   f"config.vision.{where}.{high} {vision[where][high]}")
        for key in ("image_mean", "image_std"):
            if len(vision["image"][key]) != vision["in_channels"]:
                raise _error(path, f"config.vision.image.{key} {_short(vision['image'][key])} must have "
                                   f"config.vision.in_channels = {vision['in_channels']} values")
        for i, block in enumerate(vision["fullatt_block_indexes"]):
            if block >= vision["depth"]:
                raise _error(path, f"config.vision.fullatt_block_indexes[{i}] is {block}, not below "
                                   f"config.vision.depth = {vision['depth']}")
    token2wav = config.get("token2wav")
    if token2wav is not None:
        speakers = token2wav["speakers"]
        if token2wav["default_speaker"] not in speakers:
            raise _error(path, f"config.token2wav.default_speaker {_short(token2wav['default_speaker'])} is not "
                               f"one of config.token2wav.speakers {_short(list(speakers))}")
        for name, entry in speakers.items():
            for key in ("speaker_embedding", "reference_embedding", "null_reference_embedding"):
                relpath(entry[key], _join(_join("config.token2wav.speakers", name), key))
    return graphs


def _check_graph_io(configs: Configs, graphs: dict[str, GraphSpec], path) -> None:
    """Step 4: each config block's counts and widths against its graphs' IO and the thinker's width."""
    thinker = configs.thinker

    def agree(where: str, value: int, other: str, actual: int | None) -> None:
        if actual is not None and actual != value:
            raise _disagree(path, where, value, other)

    def width(where: str, value: int, graph: str, io: str, name: str, axis: int = -1) -> None:
        spec = graphs.get(graph)
        tensor = None if spec is None else spec.tensor(io, name)
        if tensor is not None and -len(tensor.shape) <= axis < len(tensor.shape) and \
                isinstance(tensor.shape[axis], int):
            agree(where, value, f"graph {graph!r} has {io[:-1]} {name!r} of shape {list(tensor.shape)}",
                  tensor.shape[axis])

    def decoder(block: str, cfg: DecoderConfig, graph: str, embeds_width: int, embeds_where: str) -> None:
        where = f"config.{block}"
        spec = graphs.get(graph)
        if spec is not None:
            _check_kv(where, cfg, spec, path)
        width(embeds_where, embeds_width, graph, "inputs", "inputs_embeds")
        width(f"{where}.hidden_size", cfg.hidden_size, graph, "outputs", "last_hidden_state")
        width(f"{where}.vocab_size", cfg.vocab_size, graph, "outputs", "logits")

    decoder("thinker", thinker, names.THINKER_DECODER, thinker.hidden_size, "config.thinker.hidden_size")
    width("config.thinker.hidden_size", thinker.hidden_size, names.THINKER_EMBEDDING, "outputs", "inputs_embeds")
    for block, key in (("talker", "embedding_size"), ("audio", "output_dim"), ("vision", "out_hidden_size")):
        cfg = getattr(configs, block)
        if cfg is not None:  # the width of what the block hands the thinker
            agree(f"config.{block}.{key}", getattr(cfg, key), f"config.thinker.hidden_size is {thinker.hidden_size}",
                  thinker.hidden_size)
    if configs.talker is not None:
        talker = configs.talker
        decoder("talker", talker, names.TALKER_DECODER, talker.embedding_size, "config.talker.embedding_size")
        width("config.talker.embedding_size", talker.embedding_size, names.TALKER_EMBEDDING, "outputs",
              "inputs_embeds")
    if configs.audio is not None:
        audio = configs.audio
        width("config.audio.output_dim", audio.output_dim, names.AUDIO_ENCODER, "outputs", "audio_embeds")
        width("config.audio.num_mel_bins", audio.num_mel_bins, names.AUDIO_ENCODER, "inputs", "input_features", 1)
    if configs.vision is not None:
        vision = configs.vision
        width("config.vision.out_hidden_size", vision.out_hidden_size, names.VISION_ENCODER, "outputs",
              "vision_embeds")
        width("config.vision.in_channels * temporal_patch_size * patch_size^2",
              vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2, names.VISION_ENCODER,
              "inputs", "pixel_values")
    if configs.token2wav is not None:
        t2w = configs.token2wav
        for io, name in (("inputs", "x"), ("outputs", "velocity")):
            width("config.token2wav.mel_dim", t2w.mel_dim, names.TOKEN2WAV_DIT, io, name)
        width("config.token2wav.mel_dim", t2w.mel_dim, names.TOKEN2WAV_BIGVGAN, "inputs", "mel", 1)
        width("config.token2wav.enc_emb_dim", t2w.enc_emb_dim, names.TOKEN2WAV_DIT, "inputs", "speaker_embedding")
        width("config.token2wav.enc_dim", t2w.enc_dim, names.TOKEN2WAV_DIT, "inputs", "reference_embedding")


def _check_kv(where: str, cfg: DecoderConfig, spec: GraphSpec, path) -> None:
    """The decoder graph's KV inputs/outputs: a key and a value per layer of ``cfg``, of its KV shape and dtype."""
    layers = cfg.num_hidden_layers
    for io, prefix in (("inputs", "past_key_values."), ("outputs", "present.")):
        tensors = [t for t in getattr(spec, io) if t.name.startswith(prefix)]
        pairs = len(tensors) // 2
        expected = {f"{prefix}{i}.{kind}" for i in range(pairs) for kind in ("key", "value")}
        if len(tensors) != 2 * layers or {t.name for t in tensors} != expected:
            if not tensors:
                found = f"no {prefix}* {io}"
            elif {t.name for t in tensors} == expected:
                found = f"KV {io} for {pairs} layers ({prefix}0 .. {prefix}{pairs - 1})"
            else:
                found = f"KV {io} {_short([t.name for t in tensors])}"
            raise _disagree(path, f"{where}.num_hidden_layers", layers,
                            f"graph {spec.name!r} has {found} (a decoder has {prefix}{{i}}.key and .value for "
                            f"each layer i)")
        for tensor in tensors:
            at = f"graph {spec.name!r} has {io[:-1]} {tensor.name!r} of {tensor.dtype} {list(tensor.shape)}"
            if tensor.dtype != cfg.kv_dtype:
                raise _disagree(path, f"{where}.kv_dtype", repr(cfg.kv_dtype), at)
            for axis, key in ((1, "num_key_value_heads"), (3, "head_dim")):
                dim = tensor.shape[axis] if len(tensor.shape) == 4 else None
                if isinstance(dim, int) and dim != getattr(cfg, key):
                    raise _disagree(path, f"{where}.{key}", getattr(cfg, key), f"{at} (axis {axis})")


def _disagree(path, where: str, value, other: str) -> BundleError:
    """``where`` (a config value) and ``other`` (a graph's IO, another block) do not agree."""
    return _error(path, f"{where} is {value} but {other}: they must agree (a hand-edited manifest, or graphs "
                        f"from another build?)")


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


def verify_file(manifest: Manifest, relpath: str, remembered: bool = True) -> None:
    """Check the sha256 of a listed bundle file (read in 1 MiB chunks); BundleError if it differs.

    ``remembered``: a file that matched before and has not changed since (same device, inode,
    size, mtime and ctime, ``omni_runtime.bundle.hash_cache``) is not hashed again; False hashes
    it whatever the cache says (``inspect --verify``)."""
    entry = manifest.files.get(relpath)
    if entry is None:
        raise BundleError(
            f"{relpath!r} is not listed in the manifest's files", path=manifest.manifest_path, fix=REBUILD_FIX
        )
    path = manifest.path(relpath)
    expected = entry["sha256"].lower()
    if remembered and hash_cache.known(path, expected):
        return
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
    if actual != expected:
        raise BundleError(
            f"corrupt: sha256 mismatch (manifest says {expected}, file has {actual})", path=path, fix=COPY_FIX
        )
    hash_cache.remember(path, expected)


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


def _join(where: str, key: str) -> str:
    """JSON path of ``key`` inside ``where``: ``a.b`` for plain keys, ``a["x.onnx"]`` otherwise."""
    if key.isidentifier():
        return f"{where}.{key}" if where else key
    return f"{where}[{json.dumps(key) if len(key) <= 80 else json.dumps(key[:60]) + '...'}]"


def _resolve_problem(root: Path, path: Path) -> str | None:
    """Why ``path`` (inside ``root`` by its name) is unsafe once resolved, or None."""
    try:
        inside = path.resolve().is_relative_to(root)
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a name the OS rejects
        return f"it cannot be resolved ({getattr(e, 'strerror', None) or e})"
    return None if inside else "it resolves outside the bundle (a symlink?)"


def _check_files(root: Path, data: dict, manifest_path: Path) -> None:
    """Every listed file stays inside the bundle, exists and has its listed size."""
    for relpath, entry in data["files"].items():
        path = root / relpath
        problem = _resolve_problem(root, path)
        if problem is not None:
            raise _error(manifest_path, f"unsafe path {_short(relpath)} in files: {problem}")
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
