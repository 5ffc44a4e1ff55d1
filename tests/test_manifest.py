"""Bundle manifest validation: a valid hand-made bundle loads, every kind of damage is rejected
with a message naming the file and a fix."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from omni_runtime import BundleError, Manifest, OmniError, load_manifest
from omni_runtime.errors import InputError
from omni_runtime.bundle.manifest import MANIFEST_NAME, SCHEMA, SCHEMA_VERSION, validate_relpath, verify_file

FILES = {
    "thinker_decoder.onnx": b"not really onnx",
    "weights/thinker_decoder.onnx.data": b"\x00\x01" * 100,
    "tokenizer.json": b'{"version": "1.0"}',
    "chat_template.jinja": b"{{ messages }}",
}


def manifest_body(files: dict[str, bytes]) -> dict:
    """A complete schema-version-2 manifest for ``files`` (a thinker decoder of 2 layers)."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "producer": {"name": "omni-export", "version": "0.1.0"},
        "model": {"family": "qwen2_5_omni", "source": "tiny", "architectures": ["Qwen2_5OmniModel"]},
        "recipe": {"name": "fp32", "dtype": "float32", "quantization": None},
        "files": {
            rel: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for rel, data in files.items()
        },
        "tokenizer": {
            "file": "tokenizer.json",
            "chat_template_file": "chat_template.jinja",
            "default_system_prompt": "You are Qwen.",
        },
        "special_tokens": {
            "endoftext": 151643, "im_start": 151644, "im_end": 151645, "audio": 151646, "audio_bos": 151647,
            "audio_eos": 151648, "vision_bos": 151652, "vision_eos": 151653, "image": 151655, "video": 151656,
            "pad": 151643,
        },
        "generation": {
            "eos_token_ids": [151645, 151643], "pad_token_id": 151643, "do_sample": False, "temperature": 1.0,
            "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "max_new_tokens": 64,
        },
        "config": {
            "thinker": {
                "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 16, "vocab_size": 1000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                "mrope_section": [2, 3, 3], "max_position_embeddings": 4096, "kv_dtype": "float32",
            }
        },
        "graphs": {
            "thinker_decoder": {
                "file": "thinker_decoder.onnx",
                "external_data": ["weights/thinker_decoder.onnx.data"],
                "opset": 18,
                "dtype": "float32",
                "quantization": None,
                "inputs": [{"name": "inputs_embeds", "dtype": "float32", "shape": ["batch", "sequence", 64]},
                           {"name": "position_ids", "dtype": "int64", "shape": [3, "batch", "sequence"]},
                           {"name": "seqlens_k", "dtype": "int32", "shape": ["batch"]},
                           {"name": "total_sequence_length", "dtype": "int32", "shape": []},
                           *kv_io("past_key_values", "past_sequence")],
                "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 1, 1000]},
                            {"name": "last_hidden_state", "dtype": "float32", "shape": ["batch", "sequence", 64]},
                            *kv_io("present", "present_sequence")],
            }
        },
    }


def kv_io(prefix: str, axis: str, layers: int = 2) -> list[dict]:
    """The KV inputs (``past_key_values``) or outputs (``present``) of a decoder of ``layers`` layers."""
    return [{"name": f"{prefix}.{i}.{kind}", "dtype": "float32", "shape": ["batch", 2, axis, 16]}
            for i in range(layers) for kind in ("key", "value")]


def make_bundle(root: Path, edit=None, files: dict[str, bytes] = FILES) -> Path:
    """Write ``files`` and a manifest (optionally changed in place by ``edit``) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    body = manifest_body(files)
    if edit is not None:
        edit(body)
    (root / MANIFEST_NAME).write_text(json.dumps(body), encoding="utf-8")
    return root


def rejected(bundle: Path, *needles: str) -> BundleError:
    """Load ``bundle`` expecting a BundleError whose message contains every needle and a fix."""
    with pytest.raises(BundleError) as info:
        load_manifest(bundle)
    message = str(info.value)
    for needle in needles:
        assert needle in message
    assert info.value.path is not None and info.value.path in message
    assert "\n  fix: " in message
    return info.value


def test_valid_bundle_loads(tmp_path):
    manifest = load_manifest(make_bundle(tmp_path / "bundle"))
    assert isinstance(manifest, Manifest)
    assert manifest.root == (tmp_path / "bundle").resolve()
    assert manifest.special_tokens["im_end"] == 151645
    assert manifest.generation["eos_token_ids"] == [151645, 151643]
    assert manifest.config["thinker"]["head_dim"] == 16
    assert manifest.tokenizer["file"] == "tokenizer.json"
    assert manifest.producer["name"] == "omni-export"
    assert manifest.model["family"] == "qwen2_5_omni"
    assert manifest.recipe["name"] == "fp32"
    assert set(manifest.files) == set(FILES)
    graph = manifest.graph("thinker_decoder")
    assert graph.files == ("thinker_decoder.onnx", "weights/thinker_decoder.onnx.data")
    assert graph.opset == 18 and graph.quantization is None
    assert graph.inputs[0].name == "inputs_embeds"
    assert graph.inputs[0].shape == ("batch", "sequence", 64)
    assert graph.outputs[0].dtype == "float32"
    assert manifest.path("weights/thinker_decoder.onnx.data") == manifest.root / "weights/thinker_decoder.onnx.data"
    for rel in FILES:
        verify_file(manifest, rel)


def test_error_message_format():
    assert str(OmniError("broken", path="a/b", fix="do this")) == "a/b: broken\n  fix: do this"
    assert str(InputError("broken")) == "broken"
    assert str(BundleError("broken", path=Path("x"))) == "x: broken"
    error = BundleError("broken", fix="rebuild")
    assert (error.problem, error.path, error.fix) == ("broken", None, "rebuild")
    assert isinstance(error, OmniError) and isinstance(InputError("x"), OmniError)


def test_missing_directory(tmp_path):
    error = rejected(tmp_path / "nope", "does not exist", "omni-export build --model DIR --recipe fp32 --out BUNDLE")
    assert error.path.endswith("nope")


def test_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    rejected(tmp_path / "file", "not a directory")


def test_missing_manifest(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / MANIFEST_NAME).unlink()
    rejected(bundle, "not a complete bundle (an interrupted build?)", "rebuild")


def test_partial_directory(tmp_path):
    bundle = make_bundle(tmp_path / ".bundle.partial-abc123")
    rejected(bundle, "not a complete bundle (an interrupted build?)", ".bundle.partial-abc123")


def test_bad_json(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / MANIFEST_NAME).write_text('{"schema": ', encoding="utf-8")
    rejected(bundle, "invalid JSON", MANIFEST_NAME)


def test_manifest_not_an_object(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / MANIFEST_NAME).write_text("[1, 2]", encoding="utf-8")
    rejected(bundle, "must be a JSON object", MANIFEST_NAME)


def test_wrong_schema(tmp_path):
    bundle = make_bundle(tmp_path / "bundle", lambda m: m.update(schema="something.else"))
    rejected(bundle, "'something.else'", SCHEMA, MANIFEST_NAME)


@pytest.mark.parametrize("version", [1, 3, 0, "2", None])
def test_other_schema_version(tmp_path, version):
    bundle = make_bundle(tmp_path / "bundle", lambda m: m.update(schema_version=version))
    error = rejected(bundle, f"schema_version is {version!r}", f"reads schema_version {SCHEMA_VERSION}", MANIFEST_NAME)
    assert "rebuild the bundle with this omni-export version" in error.fix
    assert "omni-runtime version matching the bundle" in error.fix


@pytest.mark.parametrize(
    "location",
    [
        "producer",
        "model.family",
        "files",
        "tokenizer.chat_template_file",
        "special_tokens.im_end",
        "special_tokens.pad",
        "generation.eos_token_ids",
        "generation.top_p",
        "config.thinker",
        "config.thinker.mrope_section",
        "graphs",
        "graphs.thinker_decoder.opset",
        "graphs.thinker_decoder.external_data",
        "graphs.thinker_decoder.inputs",
    ],
)
def test_missing_key(tmp_path, location):
    def edit(body):
        *parents, key = location.split(".")
        obj = body
        for parent in parents:
            obj = obj[parent]
        del obj[key]

    rejected(make_bundle(tmp_path / "bundle", edit), f"missing key {location}", MANIFEST_NAME)


@pytest.mark.parametrize(
    "location, value, needle",
    [
        ("graphs.thinker_decoder.opset", "18", "graphs.thinker_decoder.opset must be an integer"),
        ("generation.do_sample", 1, "generation.do_sample must be a boolean"),
        ("special_tokens.audio", True, "special_tokens.audio must be an integer"),
        ("generation.temperature", "hot", "generation.temperature must be a number"),
        ("graphs.thinker_decoder.quantization", 8, "graphs.thinker_decoder.quantization must be null"),
        ("config.thinker.mrope_section", [2, 3], "mrope_section"),
        ("graphs.thinker_decoder.inputs", [{"name": "x", "dtype": "complex", "shape": [1]}], "inputs[0].dtype"),
        ("graphs.thinker_decoder.inputs", [{"name": "x", "dtype": "int64", "shape": [-1]}], "inputs[0].shape[0]"),
        ("graphs.thinker_decoder.outputs", [{"name": "y", "dtype": "int64"}], "missing key graphs.thinker_decoder"
                                                                            ".outputs[0].shape"),
        ("graphs.thinker_decoder.outputs", [{"name": "y", "dtype": "int64", "shape": []}] * 2, "duplicate names"),
    ],
)
def test_wrong_type(tmp_path, location, value, needle):
    def edit(body):
        *parents, key = location.split(".")
        obj = body
        for parent in parents:
            obj = obj[parent]
        obj[key] = value

    rejected(make_bundle(tmp_path / "bundle", edit), needle, MANIFEST_NAME)


def test_bad_files_entry(tmp_path):
    def edit(body):
        body["files"]["tokenizer.json"]["sha256"] = "xyz"

    rejected(make_bundle(tmp_path / "bundle", edit), 'files["tokenizer.json"].sha256 must be 64 hex digits')


UNSAFE = {
    "../outside.onnx": "'..' part",
    "a/../../outside.onnx": "'..' part",
    "/etc/passwd": "absolute",
    "weights\\thinker.onnx": "backslash",
    "C:/model.onnx": "drive letter",
    "weights//thinker.onnx": "empty part",
    "weights/": "empty part",
    "./thinker.onnx": "'.' part",
    "": "non-empty",
}


@pytest.mark.parametrize("relpath", UNSAFE)
def test_unsafe_graph_path(tmp_path, relpath):
    def edit(body):
        body["graphs"]["thinker_decoder"]["file"] = relpath

    rejected(make_bundle(tmp_path / "bundle", edit), "unsafe path", "graphs.thinker_decoder.file", UNSAFE[relpath])


@pytest.mark.parametrize("relpath", ["../secret.bin", "/abs/secret.bin", "dir\\secret.bin"])
def test_unsafe_files_key(tmp_path, relpath):
    def edit(body):
        body["files"][relpath] = {"bytes": 1, "sha256": "0" * 64}

    rejected(make_bundle(tmp_path / "bundle", edit), "unsafe path", "files[")


@pytest.mark.parametrize("relpath, problem", UNSAFE.items())
def test_validate_relpath(relpath, problem):
    with pytest.raises(BundleError, match="unsafe path") as info:
        validate_relpath(relpath)
    assert problem in str(info.value) and "fix:" in str(info.value)


@pytest.mark.parametrize("relpath", ["model.onnx", "weights/model.onnx.data", "a/b/c.npy", "..hidden", "x..y"])
def test_validate_relpath_accepts(relpath):
    assert validate_relpath(relpath) == relpath


def test_symlink_escaping_bundle(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_bytes(FILES["tokenizer.json"])
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "tokenizer.json").unlink()
    os.symlink(outside, bundle / "tokenizer.json")
    rejected(bundle, "unsafe path 'tokenizer.json'", "resolves outside the bundle")


def test_symlinked_directory_escaping_bundle(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "thinker_decoder.onnx.data").write_bytes(FILES["weights/thinker_decoder.onnx.data"])
    files = {rel: data for rel, data in FILES.items() if not rel.startswith("weights/")}
    bundle = make_bundle(tmp_path / "bundle", files=files)
    os.symlink(tmp_path / "elsewhere", bundle / "weights")
    body = manifest_body(FILES)
    (bundle / MANIFEST_NAME).write_text(json.dumps(body), encoding="utf-8")
    rejected(bundle, "unsafe path 'weights/thinker_decoder.onnx.data'", "outside the bundle")


def test_symlink_inside_bundle_is_fine(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "chat_template.jinja").unlink()
    (bundle / "copy.jinja").write_bytes(FILES["chat_template.jinja"])
    os.symlink(bundle / "copy.jinja", bundle / "chat_template.jinja")
    load_manifest(bundle)


def test_path_rejects_escapes(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    manifest = load_manifest(bundle)
    os.symlink(tmp_path, bundle / "up")
    for relpath in ["../x", "up/x", "/x"]:
        with pytest.raises(BundleError, match="unsafe path") as info:
            manifest.path(relpath)
        assert MANIFEST_NAME in str(info.value) and "fix:" in str(info.value)


@pytest.mark.parametrize("where", ["graph", "external", "tokenizer", "template"])
def test_file_not_listed(tmp_path, where):
    def edit(body):
        graph = body["graphs"]["thinker_decoder"]
        if where == "graph":
            graph["file"] = "other.onnx"
        elif where == "external":
            graph["external_data"].append("extra.data")
        elif where == "tokenizer":
            body["tokenizer"]["file"] = "other_tokenizer.json"
        else:
            body["tokenizer"]["chat_template_file"] = "other.jinja"

    rejected(make_bundle(tmp_path / "bundle", edit), "is not listed in files", MANIFEST_NAME)


def test_missing_file(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "weights" / "thinker_decoder.onnx.data").unlink()
    error = rejected(bundle, "missing file", "thinker_decoder.onnx.data", "copy it again")
    assert error.path == str(bundle.resolve() / "weights" / "thinker_decoder.onnx.data")


def test_wrong_size(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "thinker_decoder.onnx").write_bytes(b"short")
    rejected(bundle, "wrong size: 5 bytes", f"says {len(FILES['thinker_decoder.onnx'])}", "thinker_decoder.onnx")


def test_sha256_mismatch(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    manifest = load_manifest(bundle)
    data = bytearray(FILES["weights/thinker_decoder.onnx.data"])
    data[7] ^= 0xFF
    (bundle / "weights" / "thinker_decoder.onnx.data").write_bytes(bytes(data))
    load_manifest(bundle)  # same size: only the hash can tell
    with pytest.raises(BundleError) as info:
        verify_file(manifest, "weights/thinker_decoder.onnx.data")
    message = str(info.value)
    assert "corrupt: sha256 mismatch" in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    assert message.startswith(str(bundle.resolve() / "weights" / "thinker_decoder.onnx.data"))
    assert "fix: " in message


def test_verify_file_unlisted(tmp_path):
    manifest = load_manifest(make_bundle(tmp_path / "bundle"))
    with pytest.raises(BundleError, match="not listed"):
        verify_file(manifest, "other.bin")


def test_unknown_graph(tmp_path):
    manifest = load_manifest(make_bundle(tmp_path / "bundle"))
    with pytest.raises(BundleError, match="no graph 'talker'.*thinker_decoder"):
        manifest.graph("talker")


def test_target_and_session_config_default_for_old_bundles(tmp_path):
    manifest = load_manifest(make_bundle(tmp_path / "bundle"))
    assert manifest.target == "cpu"
    assert manifest.graph("thinker_decoder").session_config == {}


def test_target_and_session_config_are_read(tmp_path):
    def edit(body):
        body["target"] = "cuda"
        body["graphs"]["thinker_decoder"]["session_config"] = {"session.qdq_matmulnbits_accuracy_level": "4"}
        body["graphs"]["thinker_decoder"]["quantization"] = {"weights": "int8", "method": "rtn",
                                                              "granularity": "channel", "symmetric": True}

    manifest = load_manifest(make_bundle(tmp_path / "bundle", edit))
    assert manifest.target == "cuda"
    spec = manifest.graph("thinker_decoder")
    assert spec.session_config == {"session.qdq_matmulnbits_accuracy_level": "4"}
    assert spec.quantization["granularity"] == "channel"


@pytest.mark.parametrize("location,value,needle", [
    ("target", "tpu", "target"),
    ("session_config", {"key": 4}, "session_config"),
    ("quantization", {"weights": "int4", "method": "rtn", "symmetric": False}, "group_size"),
])
def test_bad_precision_fields(tmp_path, location, value, needle):
    def edit(body):
        if location == "target":
            body["target"] = value
        else:
            body["graphs"]["thinker_decoder"][location] = value

    rejected(make_bundle(tmp_path / "bundle", edit), needle)
