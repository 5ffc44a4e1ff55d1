"""Build recipes: what to export and how (dtype, quantization, components).

A recipe is a YAML file. Built-in recipes live in the repository's ``recipes/`` folder
(installed as the ``omni_export.builtin_recipes`` package); ``--recipe`` takes a built-in name or a
path to a YAML file. Schema (version 1)::

    schema_version: 1            # required, must be 1
    name: fp32                   # required, [a-z0-9_-]+
    description: text            # optional
    dtype: float32               # required: float32 (float16 arrives with the GPU recipes)
    quantization: null           # required key: null (awq / w8a8 arrive with their issue)
    components: [thinker]        # required, non-empty subset of the known components

Unknown keys and bad values are errors naming the recipe file, the key and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from omni_runtime.errors import OmniError

SCHEMA_VERSION = 1
DTYPES = ("float32",)
COMPONENTS = ("thinker",)
KEYS = {"schema_version", "name", "description", "dtype", "quantization", "components"}
REQUIRED = KEYS - {"description"}


class RecipeError(OmniError):
    """A recipe name is unknown or a recipe file is invalid."""


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    dtype: str
    quantization: dict | None
    components: tuple[str, ...]
    source: str

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description, "dtype": self.dtype,
                "quantization": self.quantization, "components": list(self.components),
                "schema_version": SCHEMA_VERSION}


def builtin_names() -> list[str]:
    """Names of the recipes shipped with omni-export."""
    folder = resources.files("omni_export.builtin_recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    """Load a built-in recipe by name, or a recipe YAML file by path, and validate it."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise RecipeError("recipe file does not exist", path=path,
                              fix=f"use a built-in recipe ({', '.join(builtin_names())}) or an existing YAML file")
        text, source = path.read_text(encoding="utf-8"), str(path)
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
    return parse_recipe(data, source)


def parse_recipe(data, source: str) -> Recipe:
    """Validate a recipe mapping read from ``source`` (used in messages)."""
    def bad(problem: str, fix: str):
        return RecipeError(problem, path=source, fix=fix)

    if not isinstance(data, dict):
        raise bad("a recipe must be a YAML mapping", "write `key: value` lines (see recipes/fp32.yaml)")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise bad(f"unknown recipe key(s): {', '.join(unknown)}",
                  f"remove them; allowed keys are {', '.join(sorted(KEYS))}")
    missing = sorted(REQUIRED - set(data))
    if missing:
        raise bad(f"missing recipe key(s): {', '.join(missing)}", "add them (see recipes/fp32.yaml)")
    if data["schema_version"] != SCHEMA_VERSION:
        raise bad(f"schema_version is {data['schema_version']!r}, this omni-export reads {SCHEMA_VERSION}",
                  f"set schema_version: {SCHEMA_VERSION}")
    name = data["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_-]+", name):
        raise bad(f"name {name!r} must match [a-z0-9_-]+", "use a short lowercase name such as fp32")
    if data["dtype"] not in DTYPES:
        raise bad(f"dtype {data['dtype']!r} is not supported", f"use one of: {', '.join(DTYPES)}")
    if data["quantization"] is not None:
        raise bad(f"quantization {data['quantization']!r} is not supported yet",
                  "set quantization: null (awq and w8a8 recipes are on the roadmap)")
    comps = data["components"]
    if not isinstance(comps, list) or not comps or any(c not in COMPONENTS for c in comps):
        raise bad(f"components {comps!r} must be a non-empty list of {', '.join(COMPONENTS)}",
                  f"use components: [{', '.join(COMPONENTS)}]")
    description = data.get("description") or ""
    return Recipe(name, str(description), data["dtype"], None, tuple(comps), source)
