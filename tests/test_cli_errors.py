"""Bad input gives one clear message naming the file and the fix, exit code 2, no traceback."""

import json
import shutil

import pytest

from conftest import run_cli


def assert_clean_error(proc, *expected):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "fix:" in proc.stderr
    for text in expected:
        assert text in proc.stderr, (text, proc.stderr)


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dest)
    return dest


def test_missing_bundle(tmp_path):
    missing = tmp_path / "nope"
    assert_clean_error(run_cli("run", missing, "--prompt", "hi"), str(missing), "omni-export build")


def test_missing_bundle_file(bundle_copy):
    (bundle_copy / "thinker_decoder.onnx.data").unlink()
    assert_clean_error(run_cli("run", bundle_copy, "--prompt", "hi"), "thinker_decoder.onnx.data")


def test_corrupt_bundle_file(bundle_copy):
    path = bundle_copy / "thinker_decoder.onnx.data"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    assert_clean_error(run_cli("run", bundle_copy, "--prompt", "hi", "--max-new-tokens", "2"),
                       "thinker_decoder.onnx.data", "sha256")


def test_corrupt_file_caught_by_inspect_verify(bundle_copy):
    path = bundle_copy / "tokenizer.json"
    text = path.read_text()
    path.write_text(text.replace('"', "'", 1)[: len(text)])
    assert_clean_error(run_cli("inspect", bundle_copy, "--verify"), "tokenizer.json")


def test_other_schema_version(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_error(run_cli("run", bundle_copy, "--prompt", "hi"), "manifest.json", "99")


def test_path_escaping_bundle_rejected(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["graphs"]["thinker_decoder"]["file"] = "../thinker_decoder.onnx"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_error(run_cli("inspect", bundle_copy), "manifest.json", "..")


def test_model_dir_not_qwen_omni(tmp_path):
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_clean_error(run_cli("build", "--model", model, "--out", tmp_path / "b"), "config.json", "qwen2_5_omni")
    assert not (tmp_path / "b").exists()


def test_model_dir_missing(tmp_path):
    assert_clean_error(run_cli("build", "--model", tmp_path / "none", "--out", tmp_path / "b"), "none")


def test_model_dir_without_weights(tiny_checkpoint, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    (model / "model.safetensors").unlink()
    assert_clean_error(run_cli("build", "--model", model, "--out", tmp_path / "b"), "model.safetensors")


def test_unknown_recipe(tiny_checkpoint, tmp_path):
    assert_clean_error(run_cli("build", "--model", tiny_checkpoint, "--recipe", "int3", "--out", tmp_path / "b"),
                       "int3", "fp32")


def test_unknown_recipe_key(tiny_checkpoint, tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("schema_version: 1\nname: mine\ndtype: float32\nquantization: null\n"
                      "components: [thinker]\nturbo: true\n")
    assert_clean_error(run_cli("build", "--model", tiny_checkpoint, "--recipe", recipe, "--out", tmp_path / "b"),
                       str(recipe), "turbo")


def test_existing_output_needs_force(tiny_checkpoint, tiny_bundle):
    assert_clean_error(run_cli("build", "--model", tiny_checkpoint, "--out", tiny_bundle), "--force")


def test_bad_sampling_parameter(tiny_bundle):
    assert_clean_error(run_cli("run", tiny_bundle, "--prompt", "hi", "--top-p", "1.5"), "top_p")


def test_empty_prompt(tiny_bundle):
    assert_clean_error(run_cli("run", tiny_bundle, "--prompt", "  "), "prompt")


def test_tiny_into_existing_dir(tiny_checkpoint):
    assert_clean_error(run_cli("tiny", tiny_checkpoint), str(tiny_checkpoint), "already exists")


def test_tiny_bad_layers(tmp_path):
    assert_clean_error(run_cli("tiny", tmp_path / "m", "--layers", "0"), "layers")
    assert not (tmp_path / "m").exists()


def test_zero_new_tokens(tiny_bundle):
    assert_clean_error(run_cli("run", tiny_bundle, "--prompt", "hi", "--max-new-tokens", "0"), "max_new_tokens")
