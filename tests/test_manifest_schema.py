"""The manifest's JSON Schema (runtime/omni_runtime/bundle/manifest.schema.json) is the contract.

* The schema is valid draft 2020-12, documented block by block, ships in the runtime package and
  agrees with the runtime's constants.
* Every bundle the build writes is validated before its manifest is written (the bundle
  writer's hook, seen running here for text-only, int4-rtn and AWQ builds); the built manifests
  are valid for a plain ``Draft202012Validator``, as another host would check them.
* Every config block agrees with its graphs' IO on load: a mismatch is a BundleError naming the
  config value and the graph (``num_hidden_layers`` 10**12 against a 2-layer graph no longer runs).
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from omni_runtime.bundle.config import Configs, SpecialTokens, ThinkerConfig, Token2WavConfig
from omni_runtime.bundle.manifest import (MANIFEST_NAME, SCHEMA_PATH, SPECIAL_TOKEN_NAMES, TENSOR_DTYPES, load_manifest,
                                          manifest_schema)
from omni_runtime.errors import BundleError

from conftest import ROOT, link_copy, run_cli


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validator(schema) -> Draft202012Validator:
    return Draft202012Validator(schema)


# ------------------------------------------------------------------------------------ the schema itself


def test_schema_is_valid_draft_2020_12(schema):
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] and schema["title"] and schema["description"]
    assert manifest_schema() == schema


def test_every_block_is_described(schema):
    """Each definition and each object or list a host reads has a description (for C++/C# host authors)."""
    missing = []

    def walk(node, where):
        if isinstance(node, dict):
            if (node.get("type") in ("object", "array") or where.count("/") == 2 and "$defs" in where) \
                    and "description" not in node and "$ref" not in node:
                missing.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(schema, "#")
    assert not missing, missing


def test_schema_agrees_with_the_runtime_constants(schema):
    assert set(schema["$defs"]["dtype"]["enum"]) == TENSOR_DTYPES
    assert tuple(schema["properties"]["special_tokens"]["required"]) == SPECIAL_TOKEN_NAMES
    assert schema["properties"]["schema_version"]["const"] == 2


def test_schema_ships_in_the_runtime_package():
    assert SCHEMA_PATH.parent == ROOT / "runtime" / "omni_runtime" / "bundle"
    project = tomllib.loads((ROOT / "runtime" / "pyproject.toml").read_text())
    assert "*.json" in project["tool"]["setuptools"]["package-data"]["omni_runtime.bundle"]
    assert any(dep.startswith("jsonschema") for dep in project["project"]["dependencies"])
    assert "manifest.schema.json" in (ROOT / "docs" / "bundle-format.md").read_text()


# ------------------------------------------------------------------------------------ built bundles


def recipe(base: Path, name: str, thinker: dict) -> str:
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"schema_version": 2, "name": name, "modules": {"thinker": thinker}}))
    return str(path)


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """Text-only, int4-rtn and AWQ bundles of the tiny checkpoint, with the manifests the writer's
    validation hook saw while each was built."""
    import omni_export.build.bundle_writer as writer
    from omni_export.build.pipeline import build_bundle

    base = tmp_path_factory.mktemp("schema-builds")
    recipes = {"text-only": recipe(base, "text-only", {"weights": "float32"}), "int4-rtn": "int4-rtn",
               "awq": recipe(base, "awq-text", {"weights": "int4", "method": "awq"})}
    out = {}
    for name, spec in recipes.items():
        seen = []

        def hook(data, path=None, seen=seen, real=writer.validate_manifest):
            seen.append(data)
            return real(data, path)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(writer, "validate_manifest", hook)
            out[name] = (build_bundle(tiny_checkpoint, spec, base / name, memory_check=False), seen)
    return out


@pytest.mark.parametrize("name", ["text-only", "int4-rtn", "awq"])
def test_the_writer_validates_every_manifest_it_writes(built, validator, name):
    bundle, seen = built[name]
    written = json.loads((bundle / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert seen == [written], "the bundle writer did not validate the manifest it wrote"
    assert not list(validator.iter_errors(written))
    manifest = load_manifest(bundle)
    configs = manifest.configs
    assert isinstance(configs, Configs) and isinstance(configs.thinker, ThinkerConfig)
    if name == "int4-rtn":
        assert written["graphs"]["thinker_decoder"]["quantization"]["method"] == "rtn"
        assert isinstance(configs.token2wav, Token2WavConfig) and configs.talker is not None
    else:  # thinker-only recipes: the other blocks are absent
        assert (configs.audio, configs.vision, configs.talker, configs.token2wav) == (None,) * 4
    if name == "awq":
        assert written["graphs"]["thinker_decoder"]["quantization"]["method"] == "awq"


def test_the_session_bundle_is_valid(tiny_bundle, validator):
    data = json.loads((tiny_bundle / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert not list(validator.iter_errors(data))
    configs = load_manifest(tiny_bundle).configs
    assert configs.special_tokens == SpecialTokens(**data["special_tokens"])
    assert configs.thinker.tmrope.position_id_per_seconds == data["config"]["thinker"]["position_id_per_seconds"]
    assert configs.audio.output_dim == configs.vision.out_hidden_size == configs.thinker.hidden_size
    assert list(configs.token2wav.speakers) == list(data["config"]["token2wav"]["speakers"])


def test_the_writer_refuses_an_invalid_manifest(tiny_bundle, tmp_path):
    from omni_export.build.bundle_writer import BundleWriter, BundleWriteError

    data = json.loads((tiny_bundle / MANIFEST_NAME).read_text(encoding="utf-8"))
    body = {key: value for key, value in data.items()
            if key not in ("schema", "schema_version", "producer", "graphs", "files")}
    body["config"] = {"thinker": {**data["config"]["thinker"], "hidden_size": "64"}}
    out = tmp_path / "bundle"
    with pytest.raises(BundleWriteError) as info, BundleWriter(out) as writer:
        for name in ("tokenizer.json", "chat_template.jinja"):
            writer.copy_file(tiny_bundle / name, name)
        writer.commit(body)
    message = str(info.value)
    assert "config.thinker.hidden_size must be an integer, not '64'" in message and "a bug in omni-export" in message
    assert not out.exists()


# ------------------------------------------------------------------------------------ config vs graphs


def edited(src: Path, dest: Path, change) -> Path:
    bundle = link_copy(src, dest)
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    change(data)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    return bundle


def set_key(path: str, value):
    def change(data):
        *parents, key = path.split(".")
        for part in parents:
            data = data[int(part)] if part.isdigit() else data[part]
        data[int(key) if key.isdigit() else key] = value
    return change


def graph_width(graph: str, io: str, name: str, width: int, axis: int = -1):
    def change(data):
        tensor = next(t for t in data["graphs"][graph][io] if t["name"] == name)
        tensor["shape"][axis] = width
    return change


MISMATCHES = {
    "thinker layers": (set_key("config.thinker.num_hidden_layers", 10**12),
                       ["config.thinker.num_hidden_layers is 1000000000000", "graph 'thinker_decoder'",
                        "KV inputs for 2 layers"]),
    "thinker hidden": (set_key("config.thinker.hidden_size", 128),
                       ["config.thinker.hidden_size is 128", "graph 'thinker_decoder'", "'inputs_embeds'", "64"]),
    "thinker kv heads": (set_key("config.thinker.num_key_value_heads", 4),
                         ["config.thinker.num_key_value_heads is 4", "'past_key_values.0.key'"]),
    "thinker vocab": (set_key("config.thinker.vocab_size", 1000),
                      ["config.thinker.vocab_size is 1000", "'logits'", "152064"]),
    "talker layers": (set_key("config.talker.num_hidden_layers", 10**12),
                      ["config.talker.num_hidden_layers is 1000000000000", "graph 'talker_decoder'"]),
    "talker hidden": (set_key("config.talker.hidden_size", 48),
                      ["config.talker.hidden_size is 48", "graph 'talker_decoder'", "'last_hidden_state'"]),
    "talker width": (set_key("config.talker.embedding_size", 32),
                     ["config.talker.embedding_size is 32", "config.thinker.hidden_size is 64"]),
    "talker embeds": (graph_width("talker_decoder", "inputs", "inputs_embeds", 32),
                      ["config.talker.embedding_size is 64", "graph 'talker_decoder'", "'inputs_embeds'"]),
    "audio width": (set_key("config.audio.output_dim", 32),
                    ["config.audio.output_dim is 32", "config.thinker.hidden_size is 64"]),
    "audio embeds": (graph_width("audio_encoder", "outputs", "audio_embeds", 32),
                     ["config.audio.output_dim is 64", "graph 'audio_encoder'", "'audio_embeds'", "32"]),
    "vision width": (set_key("config.vision.out_hidden_size", 32),
                     ["config.vision.out_hidden_size is 32", "config.thinker.hidden_size is 64"]),
    "vision embeds": (graph_width("vision_encoder", "outputs", "vision_embeds", 32),
                      ["config.vision.out_hidden_size is 64", "graph 'vision_encoder'", "'vision_embeds'"]),
    "token2wav mel": (set_key("config.token2wav.mel_dim", 81),
                      ["config.token2wav.mel_dim is 81", "graph 'token2wav_dit'"]),
}


@pytest.mark.parametrize("case", MISMATCHES)
def test_config_blocks_agree_with_their_graphs(tiny_bundle, tmp_path, validator, case):
    change, needles = MISMATCHES[case]
    bundle = edited(tiny_bundle, tmp_path / "b", change)
    assert not list(validator.iter_errors(json.loads((bundle / MANIFEST_NAME).read_text()))), \
        "the schema alone cannot see this: the loader's graph checks must"
    with pytest.raises(BundleError) as info:
        load_manifest(bundle)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert message.startswith(str(bundle.resolve() / MANIFEST_NAME)) and "fix:" in message


def test_a_manifest_that_disagrees_with_its_graph_does_not_run(tiny_bundle, tmp_path):
    """As a new user would try it: the runtime's command line refuses the bundle, naming both sides."""
    import subprocess

    bundle = edited(tiny_bundle, tmp_path / "b", set_key("config.thinker.num_hidden_layers", 10**12))
    proc = subprocess.run([sys.executable, "-m", "omni_runtime.cli", "run", str(bundle), "--prompt", "Hi",
                           "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "config.thinker.num_hidden_layers is 1000000000000" in proc.stderr
    assert "graph 'thinker_decoder'" in proc.stderr and "fix:" in proc.stderr
    inspect = run_cli("inspect", bundle)
    assert inspect.returncode != 0 and "num_hidden_layers" in inspect.stderr
