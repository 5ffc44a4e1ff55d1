"""Build recipes: which modules to export and how (weights, quantization method, calibration).

A recipe is a YAML file. Built-in recipes live in the repository's ``recipes/`` folder
(installed as the ``omni_export.builtin_recipes`` package); ``--recipe`` takes a built-in name or a
path to a YAML file. ``recipes/README.md`` documents schema version 2::

    schema_version: 2            # required, must be 2
    name: awq                    # required, [a-z0-9_-]+
    description: text            # optional
    modules:                     # required, non-empty: module name -> settings (omni_export.modules)
      thinker:
        weights: int4            # float32 | float16 | int4 | int8 (each module lists its own)
        dtype: float32           # activations: float32 | float16 (float weights: their own type)
        keep_fp32: []            # parts of a float16 graph computed in float32 (per module)
        method: awq              # none | rtn | awq
        group_size: 128
        symmetric: false
        accuracy_level: 4
        keep_float: []
        lm_head: int8
        embeddings: int8
        activations: float       # float | int8_per_token | int8_per_tensor (W8A8, weights int8)
        smooth_alpha: null       # W8A8 only: SmoothQuant migration strength in [0, 1], calibrated
        emit: qdq                # qdq | matmulnbits; W8A8: matmulinteger_u8 | matmulinteger | matmulintegertofloat
    calibration:                 # only when a module uses method awq or smooth_alpha (defaults filled if omitted)
      source: builtin            # builtin | a JSONL of conversations | an msModelSlim index.json / index.jsonl (or its folder)
      samples: 4
      sequence_length: 128
      default_text: null         # index samples without text (null: msModelSlim's Qwen2.5-Omni prompt)
      require: []                # index samples missing one of these modalities are skipped and counted
      use_audio_in_video: true   # index videos also feed their audio track
    targets:                     # optional: per build target, module settings that replace the above
      cuda:                      #   (omni-export build --target cuda); cpu uses ``modules`` as written
        modules:
          audio: {weights: float16}

The modules and what their sections accept come from the registry
(``omni_export.modules.REGISTRY``): each module class declares its ``recipe_keys``, its
``precisions`` (the ``weights`` values) and the linears ``keep_float`` can name. Omitted module
keys take the defaults of ``KEYS``. Every unknown module, key or value is a
:class:`RecipeError` naming the recipe file, the key and the valid choices. A schema version 1
file gets an error that spells out its version 2 equivalent.

This module is imported for early input validation: it imports nothing heavy (no torch; the
registry is read when a recipe is checked, and its module files are light too).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from omni_runtime.errors import OmniError

if TYPE_CHECKING:  # pragma: no cover
    from omni_export.modules.base import Module

SCHEMA_VERSION = 2
TOP_KEYS = ("schema_version", "name", "description", "modules", "calibration", "targets")
#: ``omni-export build --target``: the device a bundle is built for (its float types, session options)
TARGETS = ("cpu", "cuda")
DEFAULT_TARGET = "cpu"
V1_KEYS = ("dtype", "quantization", "components")

FLOAT_WEIGHTS = ("float32", "float16")
INT_WEIGHTS = ("int4", "int8")
WEIGHTS = FLOAT_WEIGHTS + INT_WEIGHTS
METHODS = ("none", "rtn", "awq")
INT_METHODS = ("rtn", "awq")
TABLE_DTYPES = ("float32", "int8", "int4")  # lm_head and embeddings
EMITS = ("qdq", "matmulnbits", "matmulinteger_u8", "matmulinteger", "matmulintegertofloat")
#: ``activations``: float, or int8 quantized at run time (W8A8, with ``weights: int8``)
ACTIVATIONS = ("float", "int8_per_token", "int8_per_tensor")
INT8_ACTIVATIONS = ACTIVATIONS[1:]
#: the W8A8 graph forms (``omni_export.export.w8a8_linear``); the others are the weight-only forms
W8A8_EMITS = ("matmulinteger_u8", "matmulinteger", "matmulintegertofloat")
#: keys recorded in the manifest's recipe only when set (so bundles without W8A8 keep their recipe)
OPTIONAL_KEYS = {"activations": "float", "smooth_alpha": None, "static_activations": ()}
#: list-valued keys (tuples in ModuleRecipe, lists in the manifest)
LIST_KEYS = ("keep_float", "keep_fp32", "static_activations")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)

CALIBRATION_KEYS = ("source", "samples", "sequence_length", "default_text", "require", "use_audio_in_video")
#: default_text: msModelSlim's qwen2_5_omni_thinker default (omni_export.build.calibration.DEFAULT_TEXT);
#: use_audio_in_video: as msModelSlim's Qwen2.5-Omni adapter calibrates (USE_AUDIO_IN_VIDEO = True)
CALIBRATION_DEFAULTS = {"source": "builtin", "samples": 4, "sequence_length": 128,
                        "default_text": None, "require": [], "use_audio_in_video": True}
CALIBRATION_MODALITIES = ("image", "audio", "video")


class RecipeError(OmniError):
    """A recipe name is unknown or a recipe file is invalid."""


# ---------------------------------------------------------------------------------------------
# Module keys: how each is checked, its valid choices (for messages) and its default.


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float(weights: str) -> bool:
    return weights in FLOAT_WEIGHTS


@dataclass(frozen=True)
class KeySpec:
    choices: str  # the valid values, as shown in error messages
    check: Callable[[Any], bool]
    default: Callable[[dict], Any]  # from the keys resolved so far (KEYS order)
    default_doc: str


def _one_of(values: tuple) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, type(values[0])) and not isinstance(v, bool) and v in values


#: Every module key, in resolution order (defaults of later keys may depend on ``weights``).
KEYS: dict[str, KeySpec] = {
    "weights": KeySpec(" | ".join(WEIGHTS), _one_of(WEIGHTS), lambda m: "float32", "float32"),
    "dtype": KeySpec(" | ".join(FLOAT_WEIGHTS), _one_of(FLOAT_WEIGHTS),
                     lambda m: m["weights"] if _is_float(m["weights"]) else "float32",
                     "the weights' type for float weights, float32 for int4 / int8"),
    "keep_fp32": KeySpec("a list of the module's float32 parts (e.g. norm, softmax)",
                         lambda v: isinstance(v, list) and all(isinstance(s, str) and s for s in v),
                         lambda m: [], "the module's measured default for float16, [] for float32"),
    "method": KeySpec(" | ".join(METHODS), _one_of(METHODS),
                      lambda m: "none" if _is_float(m["weights"]) else "rtn",
                      "none for float weights, rtn for int4"),
    "group_size": KeySpec("a positive multiple of 16 (e.g. 32, 64, 128)",
                          lambda v: _is_int(v) and v > 0 and v % 16 == 0, lambda m: 128, "128"),
    "symmetric": KeySpec("true | false", lambda v: isinstance(v, bool), lambda m: False, "false"),
    "accuracy_level": KeySpec("0 | 1 | 2 | 3 | 4", _one_of(ACCURACY_LEVELS), lambda m: 4, "4"),
    "keep_float": KeySpec("a list of linear names or glob patterns (e.g. layers.0.mlp.down_proj, *.k_proj)",
                          lambda v: isinstance(v, list) and all(isinstance(s, str) and s for s in v),
                          lambda m: [], "[]"),
    "lm_head": KeySpec(" | ".join(TABLE_DTYPES), _one_of(TABLE_DTYPES),
                       lambda m: "float32" if _is_float(m["weights"]) else "int8",
                       "float32 for float weights, int8 for int4"),
    "embeddings": KeySpec(" | ".join(TABLE_DTYPES), _one_of(TABLE_DTYPES),
                          lambda m: "float32" if _is_float(m["weights"]) else "int8",
                          "float32 for float weights, int8 for int4"),
    "activations": KeySpec(" | ".join(ACTIVATIONS), _one_of(ACTIVATIONS), lambda m: "float", "float"),
    "smooth_alpha": KeySpec("null or a number in [0, 1]",
                            lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    and 0 <= v <= 1),
                            lambda m: None, "null (no smoothing)"),
    "emit": KeySpec(" | ".join(EMITS), _one_of(EMITS),
                    lambda m: W8A8_EMITS[0] if m.get("activations") in INT8_ACTIVATIONS else "qdq",
                    "qdq, matmulinteger_u8 for int8 activations"),
    "static_activations": KeySpec("a list of linear names or glob patterns (e.g. *.self_attn.*)",
                                  lambda v: isinstance(v, list) and all(isinstance(s, str) and s for s in v),
                                  lambda m: [], "[] (every W8A8 linear quantizes its activation at run time)"),
}


def _registry() -> dict[str, type[Module]]:
    """The registered modules (imported on use: the registry imports this module)."""
    from omni_export.modules import REGISTRY

    return REGISTRY


#: Layer indices tried when checking that a keep_float pattern can match a linear.
_MAX_LAYERS = 1000


@dataclass(frozen=True)
class ModuleRecipe:
    """The validated settings of one module (every key filled, defaults included)."""

    name: str
    weights: str
    dtype: str
    keep_fp32: tuple[str, ...]
    method: str
    group_size: int
    symmetric: bool
    accuracy_level: int
    keep_float: tuple[str, ...]
    lm_head: str | None
    embeddings: str | None
    emit: str
    #: int8 activations (W8A8) or float; None for a module without the key
    activations: str | None = None
    #: SmoothQuant alpha of a W8A8 module, None: no smoothing
    smooth_alpha: float | None = None
    #: W8A8 linears whose activations take a calibrated per-tensor scale and offset (msModelSlim's W8A8)
    static_activations: tuple[str, ...] = ()

    @property
    def quantized(self) -> bool:
        """True if the module's linear weights are integer (int4, int8)."""
        return self.weights in INT_WEIGHTS

    @property
    def w8a8(self) -> bool:
        """True if the module's activations are int8 at run time (with int8 weights)."""
        return self.activations in INT8_ACTIVATIONS

    @property
    def calibrates(self) -> bool:
        """True if the build runs calibration data through the module (AWQ, W8A8 smoothing)."""
        return self.method == "awq" or self.smooth_alpha is not None or bool(self.static_activations)

    @property
    def float_dtype(self) -> str:
        """The float type of the module's activations and non-quantized weights (``dtype``)."""
        return self.dtype

    def keeps_float(self, linear: str) -> bool:
        """True if ``linear`` (e.g. ``layers.0.mlp.down_proj``) matches a ``keep_float`` entry."""
        return any(fnmatch.fnmatchcase(linear, pattern) for pattern in self.keep_float)

    def static_linear(self, linear: str) -> bool:
        """True if W8A8 ``linear`` quantizes its activation with calibrated static parameters."""
        return any(fnmatch.fnmatchcase(linear, pattern) for pattern in self.static_activations)

    def to_json(self) -> dict:
        module = _registry()[self.name]
        optional = {**OPTIONAL_KEYS, **module.optional_recipe_keys}
        return {key: list(getattr(self, key)) if key in LIST_KEYS else getattr(self, key)
                for key in module.recipe_keys if key not in optional or getattr(self, key) != optional[key]}


@dataclass(frozen=True)
class CalibrationRecipe:
    """Calibration data for AWQ: the built-in conversations or a JSONL file."""

    source: str  # "builtin", "file" (a JSONL of conversations) or "index" (an msModelSlim index)
    samples: int
    sequence_length: int
    file: Path | None = None  # the JSONL file or the index file (index.json / index.jsonl)
    sha256: str | None = None  # of that file, recorded in the manifest
    #: index samples without text take this (None: msModelSlim's qwen2_5_omni_thinker default)
    default_text: str | None = None
    #: modalities an index sample must have to be used (the others are skipped and counted)
    require: tuple[str, ...] = ()
    #: index videos also feed their audio track (interleaved, as msModelSlim calibrates)
    use_audio_in_video: bool = True

    @property
    def index(self) -> bool:
        """True if the samples come from an msModelSlim index (multimodal)."""
        return self.source == "index"

    @property
    def text(self) -> str:
        """The text of an index sample that has none."""
        from omni_export.build.calibration import DEFAULT_TEXT

        return DEFAULT_TEXT if self.default_text is None else self.default_text

    def to_json(self) -> dict:
        data = {"source": self.source, "samples": self.samples, "sequence_length": self.sequence_length}
        if self.file is not None:
            data.update(file=self.file.name, sha256=self.sha256)
        if self.index:  # the keys that shape an index's samples (text-only recipes record none)
            data.update(default_text=self.text, require=list(self.require), use_audio_in_video=self.use_audio_in_video)
        return data


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    modules: dict[str, ModuleRecipe] = field(hash=False)
    calibration: CalibrationRecipe | None
    source: str
    #: the build target the modules were resolved for (``targets.<target>`` applied)
    target: str = DEFAULT_TARGET

    def module(self, name: str) -> ModuleRecipe:
        """The settings of module ``name``; RecipeError if the recipe does not export it."""
        if name not in self.modules:
            known = f"unknown module {name!r}" if name not in _registry() else f"the recipe does not export {name!r}"
            raise RecipeError(known, path=self.source,
                              fix=f"the recipe's modules are: {', '.join(self.modules)}")
        return self.modules[name]

    def to_json(self) -> dict:
        """The recipe as recorded in the bundle manifest (``recipe``)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "description": self.description,
            "modules": {name: module.to_json() for name, module in self.modules.items()},
            "calibration": None if self.calibration is None else self.calibration.to_json(),
        }

    def with_calibration_file(self, path: str | Path) -> Recipe:
        """This recipe calibrating on ``path`` (``--calib``): a JSONL file of conversations or an
        msModelSlim index (file or directory), checked now; the recipe's other calibration keys stay."""
        path = Path(path)
        if self.calibration is None:
            raise RecipeError(f"recipe {self.name!r} does not calibrate (no module uses method awq or "
                              "smooth_alpha), "
                              "so it has no use for a calibration file", path=path,
                              fix="drop --calib, or use a recipe with method awq such as --recipe awq")
        return dataclasses.replace(self, calibration=_file_calibration(self.calibration, path))

    def with_setting(self, key: str, value, flag: str | None = None) -> Recipe:
        """This recipe with ``key`` set to ``value`` in every module section that has the key (a
        command-line override such as ``--emit``, named ``flag`` in the error of a bad value)."""
        spec = KEYS[key]
        if not spec.check(value):
            raise RecipeError(f"{flag or key} {value!r} is not a choice", fix=f"use one of: {spec.choices}")
        registry = _registry()

        def takes(name: str, m: ModuleRecipe) -> bool:  # a linear's form means nothing to float weights
            return key in registry[name].recipe_keys and not (key == "emit" and not m.quantized)

        modules = {name: dataclasses.replace(m, **{key: value}) if takes(name, m) else m
                   for name, m in self.modules.items()}
        for m in modules.values():  # an emit override keeps weight-only and W8A8 forms apart
            if m.emit is not None and m.w8a8 != (m.emit in W8A8_EMITS):
                forms = W8A8_EMITS if m.w8a8 else tuple(e for e in EMITS if e not in W8A8_EMITS)
                raise RecipeError(f"{flag or key} {value!r} does not fit modules.{m.name} "
                                  f"({'W8A8' if m.w8a8 else 'weight-only'})", fix=f"use one of: {', '.join(forms)}")
        return dataclasses.replace(self, modules=modules)


def recipe_summary(recipe_json: dict) -> str:
    """One line describing a manifest's ``recipe`` object (schema 2, or 1 from older bundles)."""
    if recipe_json.get("schema_version") != SCHEMA_VERSION:
        return f"{recipe_json.get('dtype')}, quantization {recipe_json.get('quantization')}"
    parts = []
    for name, m in (recipe_json.get("modules") or {}).items():
        text = f"{name} {m.get('weights')}"
        if m.get("activations") not in (None, "float"):
            text += f" w8a8 activations {m['activations']}"
            if m.get("smooth_alpha") is not None:
                text += f" smooth {m['smooth_alpha']}"
        elif m.get("method") not in (None, "none"):
            sym = "sym" if m.get("symmetric") else "asym"
            text += f" {m['method']} g{m.get('group_size')} {sym}"
        for table in ("lm_head", "embeddings"):
            if m.get(table) is not None:
                text += f", {table} {m[table]}"
        parts.append(text)
    return "; ".join(parts)


def builtin_names() -> list[str]:
    """Names of the recipes shipped with omni-export."""
    folder = resources.files("omni_export.builtin_recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def check_target(target) -> str:
    """``target`` if it is a build target, else a RecipeError naming ``--target``."""
    if target not in TARGETS:
        raise RecipeError(f"--target {target!r} is not a build target", fix=f"use one of: {', '.join(TARGETS)}")
    return target


def load_recipe(name_or_path: str | Path, target: str = DEFAULT_TARGET) -> Recipe:
    """Load a built-in recipe by name, or a recipe YAML file by path, and validate it for the
    build ``target`` (its ``targets.<target>`` module settings applied)."""
    check_target(target)
    name_or_path = str(name_or_path)
    path = Path(name_or_path)
    base = None
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise RecipeError("recipe file does not exist", path=path,
                              fix=f"use a built-in recipe ({', '.join(builtin_names())}) or an existing YAML file")
        text, source, base = path.read_text(encoding="utf-8"), str(path), path.parent
    else:
        if name_or_path not in builtin_names():
            raise RecipeError(f"unknown recipe {name_or_path!r}", path=f"recipes/{name_or_path}.yaml",
                              fix=f"choose one of: {', '.join(builtin_names())}, or pass a path to a recipe YAML file")
        ref = resources.files("omni_export.builtin_recipes") / f"{name_or_path}.yaml"
        text, source = ref.read_text(encoding="utf-8"), f"recipes/{name_or_path}.yaml"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"not valid YAML ({exc})", path=source, fix="fix the YAML syntax") from None
    return parse_recipe(data, source, base=base, target=target)


def parse_recipe(data, source: str, base: Path | None = None, target: str = DEFAULT_TARGET) -> Recipe:
    """Validate a recipe mapping read from ``source`` (used in messages) for the build ``target``.
    A relative calibration ``source`` path is taken relative to ``base`` (the recipe file's
    folder; None: not allowed)."""
    check_target(target)
    def bad(problem: str, fix: str):
        return RecipeError(problem, path=source, fix=fix)

    if not isinstance(data, dict):
        raise bad("a recipe must be a YAML mapping", "write `key: value` lines (see recipes/fp32.yaml)")
    version = data.get("schema_version")
    if version == 1 or (version is None and any(k in data for k in V1_KEYS)):
        raise bad("this is a schema version 1 recipe (dtype, quantization, components); "
                  f"this omni-export reads schema version {SCHEMA_VERSION}", _v1_conversion(data))
    if "schema_version" not in data:
        raise bad("missing recipe key: schema_version", f"add schema_version: {SCHEMA_VERSION} as the first line")
    if version != SCHEMA_VERSION:
        raise bad(f"schema_version is {version!r}, this omni-export reads {SCHEMA_VERSION}",
                  f"set schema_version: {SCHEMA_VERSION} (see recipes/README.md)")
    for key in data:
        if key in V1_KEYS:
            raise bad(f"recipe key {key!r} belongs to schema version 1", _v1_conversion(data))
        if key not in TOP_KEYS:
            raise bad(f"unknown recipe key {key!r}", f"remove it; the recipe keys are: {', '.join(TOP_KEYS)}")
    for key in ("name", "modules"):
        if key not in data:
            raise bad(f"missing recipe key: {key}", "add it (see recipes/fp32.yaml)")
    name = data["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_-]+", name):
        raise bad(f"name {name!r} must match [a-z0-9_-]+", "use a short lowercase name such as fp32")
    description = data.get("description")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise bad(f"description must be text, got {description!r}", "write description: followed by one line of text")

    raw_modules = data["modules"]
    if not isinstance(raw_modules, dict) or not raw_modules:
        raise bad(f"modules must be a non-empty mapping of module name -> settings, got {raw_modules!r}",
                  f"write e.g. `modules: {{thinker: {{weights: float32}}}}`; known modules: {', '.join(_registry())}")
    overrides = _target_modules(data.get("targets"), target, raw_modules, bad)
    modules = {}
    for module_name, settings in raw_modules.items():
        if module_name in overrides:  # the target's section replaces the keys it names
            settings = {**(settings or {}), **overrides[module_name]} if isinstance(settings, (dict, type(None))) \
                else settings
        modules[module_name] = _parse_module(module_name, settings, bad)

    uses_awq = [m.name for m in modules.values() if m.calibrates]
    raw_cal = data.get("calibration")
    if raw_cal is not None and not uses_awq:
        raise bad("calibration is set but no module uses method awq (or smooth_alpha)",
                  "remove the calibration section, or set method: awq on a module")
    calibration = _parse_calibration(raw_cal, bad, source, base) if uses_awq else None
    return Recipe(name, description, modules, calibration, source, target)


def _target_modules(raw, target: str, raw_modules: dict, bad) -> dict[str, dict]:
    """The ``targets`` section's module settings for ``target`` (checked for every target, so a
    recipe's mistake shows whatever it is built for): module name -> the keys it replaces."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise bad(f"targets must be a mapping of build target -> settings, got {raw!r}",
                  "write e.g. `targets: {cuda: {modules: {audio: {weights: float16}}}}`")
    chosen = {}
    for name, section in raw.items():
        if name not in TARGETS:
            raise bad(f"unknown build target {name!r} in targets", f"use one of: {', '.join(TARGETS)}")
        if not isinstance(section, dict) or set(section) - {"modules"}:
            raise bad(f"targets.{name} must be a mapping with one key, modules",
                      f"write `targets: {{{name}: {{modules: {{audio: {{weights: float16}}}}}}}}`")
        modules = section.get("modules") or {}
        if not isinstance(modules, dict):
            raise bad(f"targets.{name}.modules must be a mapping of module name -> settings, got {modules!r}",
                      "write e.g. `audio: {weights: float16}` under it")
        for module_name, settings in modules.items():
            if module_name not in raw_modules:
                raise bad(f"targets.{name}.modules names {module_name!r}, which the recipe's modules do not export",
                          f"add {module_name} to modules, or remove it from targets.{name}")
            if not isinstance(settings, dict):
                raise bad(f"targets.{name}.modules.{module_name} must be a mapping of settings, got {settings!r}",
                          "write e.g. `{weights: float16}`")
            _parse_module(module_name, {**(raw_modules[module_name] or {}), **settings}, bad)  # valid as merged
        if name == target:
            chosen = modules
    return chosen


def default_settings(name: str) -> ModuleRecipe:
    """The settings of module ``name`` with every key at its default (float32 weights)."""
    return _parse_module(name, {}, lambda problem, fix: RecipeError(problem, fix=fix))


def _parse_module(name, settings, bad) -> ModuleRecipe:
    registry = _registry()
    if name not in registry:
        raise bad(f"unknown module {name!r} in modules", f"use one of: {', '.join(registry)}")
    module = registry[name]
    keys = module.recipe_keys
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise bad(f"modules.{name} must be a mapping of settings, got {settings!r}",
                  f"write e.g. `{name}: {{weights: int4, method: rtn}}`; keys: {', '.join(keys)}")
    for key in settings:
        if key not in keys:
            raise bad(f"unknown key {key!r} in modules.{name}", f"use one of: {', '.join(keys)}")
    values: dict[str, Any] = {}
    for key in KEYS:
        if key not in keys:
            if key == "method":  # a module without the key quantizes its int weights round-to-nearest
                values[key] = "rtn" if values["weights"] in INT_WEIGHTS else "none"
            elif key == "dtype":
                values[key] = KEYS[key].default(values)
            elif key == "keep_fp32":
                values[key] = ()
            else:
                values[key] = None
            continue
        ks = KEYS[key]
        if key not in settings:
            if key == "keep_fp32":  # the module's measured float16 default (recipes/README.md)
                values[key] = list(module.default_keep_fp32) if values["dtype"] == "float16" else []
            else:
                values[key] = ks.default(values)
            continue
        value = settings[key]
        if not ks.check(value):
            raise bad(f"modules.{name}.{key}: {value!r} is not valid", f"use {ks.choices}")
        values[key] = value
    if values["weights"] not in module.precisions and values["weights"] not in module.planned:
        raise bad(f"modules.{name}.weights: {values['weights']} is not built for the {name} module yet",
                  f"use weights: {' | '.join(module.precisions)}")
    weights, method = values["weights"], values["method"]
    if weights in INT_WEIGHTS and method not in INT_METHODS:
        raise bad(f"modules.{name}: weights {weights} needs method rtn or awq, got {method}",
                  "set method: rtn (round to nearest, no calibration) or method: awq (calibrated)")
    if weights in FLOAT_WEIGHTS and method != "none":
        raise bad(f"modules.{name}: method {method} quantizes, but weights is {weights}",
                  f"set weights: int4 to quantize with {method}, or method: none to keep {weights}")
    w8a8 = values.get("activations") in INT8_ACTIVATIONS
    if w8a8:
        _check_w8a8(name, values, bad)
        if settings.get("symmetric") is False:
            raise bad(f"modules.{name}: W8A8 weights and activations are symmetric, got symmetric: false",
                      "remove symmetric (or set symmetric: true)")
        values["symmetric"] = True
    else:
        if values.get("emit") in W8A8_EMITS:
            raise bad(f"modules.{name}.emit: {values['emit']} is a W8A8 form (int8 activations)",
                      "set activations: int8_per_token with weights: int8 (recipes/w8a8.yaml), or emit: qdq")
        if values.get("smooth_alpha") is not None:
            raise bad(f"modules.{name}.smooth_alpha is set but activations is {values.get('activations')}",
                      "smoothing is for int8 activations: set activations: int8_per_token, or remove smooth_alpha")
        if values.get("static_activations"):
            raise bad(f"modules.{name}.static_activations is set but activations is {values.get('activations')}",
                      "static activations are for W8A8: set activations: int8_per_token with weights: int8, "
                      "or remove static_activations")
    if weights in module.planned and not w8a8:  # a precision the schema knows and the module will build later
        raise bad(f"modules.{name}.weights: {module.planned[weights]}",
                  f"use weights: {' | '.join(module.precisions)}")
    if method != "none" and method not in module.methods:
        raise bad(f"modules.{name}.method: {method} is not built for the {name} module",
                  f"use method: {' | '.join(module.methods)}")
    dtype = values["dtype"]
    if weights in FLOAT_WEIGHTS and dtype != weights:
        raise bad(f"modules.{name}: dtype {dtype} differs from weights {weights}",
                  f"float weights compute in their own type: drop dtype, or set weights: {dtype}")
    if dtype not in module.dtypes:
        raise bad(f"modules.{name}.dtype: {dtype} activations are not built for the {name} module",
                  f"use dtype: {' | '.join(module.dtypes)}")
    if isinstance(values["keep_fp32"], list):
        if values["keep_fp32"] and dtype != "float16":
            raise bad(f"modules.{name}.keep_fp32 is set but dtype is {dtype}",
                      "keep_fp32 names parts of a float16 graph: set dtype: float16 (or weights: float16), "
                      "or remove keep_fp32")
        for part in values["keep_fp32"]:
            if part not in module.fp32_parts:
                raise bad(f"modules.{name}.keep_fp32: {part!r} is not a part of the {name} graphs",
                          f"use some of: {', '.join(module.fp32_parts)}")
        values["keep_fp32"] = tuple(values["keep_fp32"])
    if values["keep_float"] is not None:
        for pattern in values["keep_float"]:
            if not _matches_some_linear(module, pattern):
                example = f"{module.layer_prefix}.<i>.<linear>"
                raise bad(f"modules.{name}.keep_float: {pattern!r} matches no linear layer of the {name}",
                          f"write names as {example} or glob patterns such as *.{module.linears[1].split('.')[-1]}; "
                          f"the linears are: {', '.join(module.linears)}")
        values["keep_float"] = tuple(values["keep_float"])
    if values.get("static_activations") is not None:
        for pattern in values["static_activations"]:
            if not _matches_some_linear(module, pattern):
                raise bad(f"modules.{name}.static_activations: {pattern!r} matches no linear layer of the {name}",
                          f"write names as {module.layer_prefix}.<i>.<linear> or glob patterns such as *.self_attn.*; "
                          f"the linears are: {', '.join(module.linears)}")
        values["static_activations"] = tuple(values["static_activations"])
    return ModuleRecipe(name=name, **values)


def _check_w8a8(name: str, values: dict, bad) -> None:
    """A W8A8 section (int8 activations): int8 weights per channel, rtn, float32, a W8A8 emit."""
    act = values["activations"]
    if values["weights"] != "int8":
        raise bad(f"modules.{name}: activations {act} needs weights int8 (W8A8), got {values['weights']}",
                  "set weights: int8 (see recipes/w8a8.yaml), or activations: float")
    if values["method"] != "rtn":
        raise bad(f"modules.{name}: W8A8 weights are round-to-nearest per output channel, got method "
                  f"{values['method']}", "set method: rtn (smoothing is smooth_alpha)")
    if values["dtype"] != "float32" and name != "thinker":
        raise bad(f"modules.{name}: a W8A8 {name} computes in float32, got dtype {values['dtype']}",
                  "set dtype: float32 (the thinker's W8A8 also takes float16 float parts)")
    if values["emit"] not in W8A8_EMITS:
        raise bad(f"modules.{name}.emit: {values['emit']} is a weight-only form, not W8A8",
                  f"use emit: {' | '.join(W8A8_EMITS)}")


def _matches_some_linear(module: type[Module], pattern: str) -> bool:
    regex = re.compile(fnmatch.translate(pattern))
    return any(regex.match(f"{module.layer_prefix}.{i}.{linear}")
               for i in range(_MAX_LAYERS) for linear in module.linears)


def _parse_calibration(raw, bad, source: str, base: Path | None) -> CalibrationRecipe:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise bad(f"calibration must be a mapping, got {raw!r}",
                  "write e.g. `calibration: {source: builtin, samples: 4, sequence_length: 128}`")
    for key in raw:
        if key not in CALIBRATION_KEYS:
            raise bad(f"unknown key {key!r} in calibration", f"use one of: {', '.join(CALIBRATION_KEYS)}")
    values = {**CALIBRATION_DEFAULTS, **raw}
    for key in ("samples", "sequence_length"):
        if not _is_int(values[key]) or values[key] < 1:
            raise bad(f"calibration.{key}: {values[key]!r} is not valid", "use a positive integer")
    text = values["default_text"]
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise bad(f"calibration.default_text: {text!r} is not valid",
                  "use a non-empty string (the text of index samples without one)")
    require = values["require"]
    if (not isinstance(require, list) or any(k not in CALIBRATION_MODALITIES for k in require)
            or len(set(require)) != len(require)):
        raise bad(f"calibration.require: {require!r} is not valid",
                  f"use a list of distinct modalities from: {', '.join(CALIBRATION_MODALITIES)} (e.g. [image])")
    if not isinstance(values["use_audio_in_video"], bool):
        raise bad(f"calibration.use_audio_in_video: {values['use_audio_in_video']!r} is not valid", "use true or false")
    src = values["source"]
    if not isinstance(src, str) or not src:
        raise bad(f"calibration.source: {src!r} is not valid",
                  "use builtin, the path of a JSONL file of conversations, or an msModelSlim index "
                  "(index.json / index.jsonl, or a directory holding one)")
    cal = CalibrationRecipe("builtin", values["samples"], values["sequence_length"], default_text=text,
                            require=tuple(require), use_audio_in_video=values["use_audio_in_video"])
    if src == "builtin":
        return cal
    path = Path(src).expanduser()
    if not path.is_absolute():
        if base is None:
            raise bad(f"calibration.source: relative path {src!r} in a built-in recipe",
                      "pass the file with --calib FILE instead")
        path = base / path
    return _file_calibration(cal, path, recipe_source=source)


def _file_calibration(cal: CalibrationRecipe, path: Path, recipe_source: str | None = None) -> CalibrationRecipe:
    """``cal`` reading ``path``: a JSONL of conversations, or an msModelSlim index (a file named
    index.json / index.jsonl, or a directory holding exactly one), whose content is checked now
    (a CalibrationError otherwise)."""
    from omni_export.build.calibration import index_file, index_samples, load_calibration_file

    where = f"; it is named by calibration.source in {recipe_source}" if recipe_source else ""
    if not path.exists():
        raise RecipeError("calibration file does not exist", path=path,
                          fix="pass an existing JSONL file of conversations (one messages list per line), or an "
                              "msModelSlim index (index.json / index.jsonl, or a directory holding one)" + where)
    index = index_file(path)  # a directory without exactly one index is refused there
    if index is None:
        load_calibration_file(path)
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        return dataclasses.replace(cal, source="file", file=path, sha256=sha256)
    index_samples(index, cal.text, cal.require)
    sha256 = hashlib.sha256(index.read_bytes()).hexdigest()
    return dataclasses.replace(cal, source="index", file=index, sha256=sha256)


def _v1_conversion(data: dict) -> str:
    """The fix of a schema-1 recipe: its schema-2 equivalent."""
    dtype = data.get("dtype") if data.get("dtype") in FLOAT_WEIGHTS else "float32"
    comps = data.get("components")
    comps = [c for c in comps if c in _registry()] if isinstance(comps, list) else []
    modules = ", ".join(f"{c}: {{weights: {dtype}, method: none}}" for c in comps or ["thinker"])
    return ("convert it to schema version 2: set `schema_version: 2` and replace `dtype`, `quantization` and "
            f"`components` with `modules: {{{modules}}}` (recipes/README.md describes version 2; "
            "for int4 see recipes/int4-rtn.yaml and recipes/awq.yaml)")
