"""Bad input gives one clear message naming the file and the fix, exit code 2, no traceback."""

import json
import shutil

import pytest

from conftest import link_copy, run_cli


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
    recipe.write_text("schema_version: 2\nname: mine\nmodules:\n  thinker:\n    weights: float32\n"
                      "    turbo: true\n")
    assert_clean_error(run_cli("build", "--model", tiny_checkpoint, "--recipe", recipe, "--out", tmp_path / "b"),
                       str(recipe), "turbo")


def test_existing_output_needs_force(tiny_checkpoint, tiny_bundle):
    assert_clean_error(run_cli("build", "--model", tiny_checkpoint, "--out", tiny_bundle), "--force")


def test_bad_sampling_parameter(tiny_bundle):
    assert_clean_error(run_cli("run", tiny_bundle, "--prompt", "hi", "--top-p", "1.5"), "--top-p must be in (0, 1]")


def test_empty_prompt(tiny_bundle):
    assert_clean_error(run_cli("run", tiny_bundle, "--prompt", "  "), "prompt")


def test_tiny_into_existing_dir(tiny_checkpoint):
    assert_clean_error(run_cli("tiny", tiny_checkpoint), str(tiny_checkpoint), "already exists")


def test_tiny_bad_layers(tmp_path):
    assert_clean_error(run_cli("tiny", tmp_path / "m", "--layers", "0"), "layers")
    assert not (tmp_path / "m").exists()


def test_zero_new_tokens(tiny_bundle):
    assert_clean_error(run_cli("run", tiny_bundle, "--prompt", "hi", "--max-new-tokens", "0"), "--max-new-tokens")


# ------------------------------------------------------------------------------ no rich markup


@pytest.mark.parametrize("args, text", [
    (("run", "{tmp}/a[/x]b", "--prompt", "hi"), "{tmp}/a[/x]b: bundle directory does not exist"),
    (("run", "{tmp}/my[bold]bundle", "--prompt", "hi"), "{tmp}/my[bold]bundle: bundle directory does not exist"),
    (("inspect", "{tmp}/a[/x]b"), "{tmp}/a[/x]b: bundle directory does not exist"),
    (("build", "--model", "{tmp}/m[/x]", "--out", "{tmp}/b[bold]"), "{tmp}/m[/x]: model directory does not exist"),
    (("build", "--model", "{ckpt}", "--out", "{tmp}/o[red]x", "--force"), "{tmp}/o[red]x: exists and is a file"),
    (("tiny", "{tmp}/t[bold]x"), "{tmp}/t[bold]x: exists and is a file"),
    (("run", "{bundle}", "--prompt", "hi", "--top-p", "2"), "--top-p must be in (0, 1], got 2.0"),
], ids=["run-close-tag", "run-bold", "inspect", "build-model", "build-out", "tiny-out", "message"])
def test_bracketed_text_is_never_markup(tmp_path, tiny_checkpoint, tiny_bundle, args, text):
    (tmp_path / "o[red]x").write_text("a file")
    (tmp_path / "t[bold]x").write_text("a file")
    values = {"tmp": tmp_path, "ckpt": tiny_checkpoint, "bundle": tiny_bundle}
    proc = run_cli(*[a.format(**values) for a in args])
    assert_clean_error(proc, "error: " + text.format(**values))


def test_yaml_excerpt_keeps_its_brackets(tiny_checkpoint, tmp_path):
    recipe = tmp_path / "r[1].yaml"
    recipe.write_text("schema_version: 2\nname: [oops\n")
    proc = run_cli("build", "--model", tiny_checkpoint, "--recipe", recipe, "--out", tmp_path / "b")
    assert_clean_error(proc, str(recipe), "name: [oops")


def test_cuda_fix_keeps_the_extra(tiny_bundle):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here")
    proc = run_cli("run", tiny_bundle, "--prompt", "hi", "--device", "cuda")
    assert_clean_error(proc, "pip install omni-runtime[gpu], or use --device cpu")


def test_bundle_under_bracketed_path_runs_and_inspects(tiny_bundle, tmp_path):
    bundle = link_copy(tiny_bundle, tmp_path / "a[" / "x]b[bold]", real=())
    proc = run_cli("inspect", bundle)
    assert proc.returncode == 0, proc.stderr
    assert str(bundle.resolve()) in proc.stdout
    proc = run_cli("run", bundle, "--prompt", "[bold]hi[/x]", "--system", "[/y] be brief", "--greedy",
                   "--max-new-tokens", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert len(body["token_ids"]) >= 1 and body["finish_reason"] in ("eos", "length")


def test_tiny_success_message_keeps_brackets(tmp_path):
    out = tmp_path / "m[bold]x[/x]"
    proc = run_cli("tiny", out)
    assert proc.returncode == 0, proc.stderr
    assert f"to {out}" in proc.stderr
    assert (out / "config.json").is_file()
