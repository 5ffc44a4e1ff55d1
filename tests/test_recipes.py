"""Recipe loading and validation (schema version 2, recipes/README.md)."""

import json
import subprocess
import sys

import pytest
import yaml

from omni_export.build.recipes import (
    KEYS,
    RecipeError,
    builtin_names,
    load_recipe,
    parse_recipe,
    recipe_summary,
)
from omni_export.modules import REGISTRY

SOURCE = "recipes/mine.yaml"


def recipe(**thinker):
    return {"schema_version": 2, "name": "mine", "modules": {"thinker": thinker}}


def rejected(data, *needles, source=SOURCE):
    """parse_recipe(data) raises a RecipeError naming the file, a fix and every needle."""
    with pytest.raises(RecipeError) as info:
        parse_recipe(data, source)
    message = str(info.value)
    assert info.value.path == source and "fix:" in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# -- built-in recipes ------------------------------------------------------------------------


def test_builtin_names():
    assert {"fp32", "int4-rtn", "awq"} <= set(builtin_names())


def test_builtin_fp32():
    r = load_recipe("fp32")
    assert (r.name, r.calibration) == ("fp32", None)
    assert list(r.modules) == ["thinker", "audio", "talker", "vision", "token2wav"][:len(r.modules)]
    t = r.module("thinker")
    assert (t.weights, t.method, t.embeddings, t.lm_head, t.quantized) == ("float32", "none", "float32", "float32", False)


@pytest.mark.parametrize("name,method", [("int4-rtn", "rtn"), ("awq", "awq")])
def test_builtin_int4(name, method):
    r = load_recipe(name)
    t = r.module("thinker")
    assert (t.weights, t.method, t.group_size, t.symmetric, t.accuracy_level) == ("int4", method, 128, False, 4)
    assert (t.lm_head, t.embeddings, t.keep_float, t.emit) == ("int4", "int8", (), "qdq")
    assert t.quantized and t.float_dtype == "float32"
    if method == "awq":
        cal = r.calibration
        assert (cal.source, cal.samples, cal.sequence_length, cal.file) == ("builtin", 4, 128, None)
    else:
        assert r.calibration is None


def test_to_json_for_the_manifest():
    data = load_recipe("awq").to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["schema_version"] == 2 and data["name"] == "awq"
    assert data["modules"]["thinker"] == {
        "weights": "int4", "dtype": "float32", "keep_fp32": [], "method": "awq", "group_size": 128,
        "symmetric": False, "accuracy_level": 4, "keep_float": [], "lm_head": "int4", "embeddings": "int8",
        "emit": "qdq"}
    assert data["calibration"] == {"source": "builtin", "samples": 4, "sequence_length": 128}
    assert load_recipe("fp32").to_json()["calibration"] is None
    assert recipe_summary(data).startswith("thinker int4 awq g128 asym, lm_head int4, embeddings int8")
    assert recipe_summary({"name": "fp32", "dtype": "float32", "quantization": None}) == "float32, quantization None"


# -- files and defaults ----------------------------------------------------------------------


def test_recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("schema_version: 2\nname: r\nmodules:\n  thinker:\n    weights: int4\n    method: rtn\n"
                    "    group_size: 64\n    symmetric: true\n    keep_float: ['*.k_proj', layers.0.mlp.down_proj]\n"
                    "    emit: matmulnbits\n    accuracy_level: 0\n")
    r = load_recipe(str(path))
    t = r.module("thinker")
    assert (r.name, r.source, t.group_size, t.symmetric, t.emit, t.accuracy_level) == \
        ("r", str(path), 64, True, "matmulnbits", 0)
    assert t.keep_float == ("*.k_proj", "layers.0.mlp.down_proj")
    assert t.keeps_float("layers.7.self_attn.k_proj") and t.keeps_float("layers.0.mlp.down_proj")
    assert not t.keeps_float("layers.1.mlp.down_proj") and not t.keeps_float("layers.0.self_attn.q_proj")


def test_defaults_float():
    for settings in (None, {}):
        data = {"schema_version": 2, "name": "mine", "modules": {"thinker": settings}}
        t = parse_recipe(data, SOURCE).module("thinker")
        assert (t.weights, t.method, t.lm_head, t.embeddings) == ("float32", "none", "float32", "float32")
        assert (t.group_size, t.symmetric, t.accuracy_level, t.keep_float, t.emit) == (128, False, 4, (), "qdq")


def test_defaults_int4_and_awq_calibration():
    t = parse_recipe(recipe(weights="int4"), SOURCE).module("thinker")
    assert (t.method, t.group_size, t.symmetric, t.accuracy_level, t.lm_head, t.embeddings, t.emit) == \
        ("rtn", 128, False, 4, "int8", "int8", "qdq")
    r = parse_recipe(recipe(weights="int4", method="awq"), SOURCE)
    assert (r.calibration.source, r.calibration.samples, r.calibration.sequence_length) == ("builtin", 4, 128)
    data = {**recipe(weights="int4", method="awq"), "calibration": {"samples": 8}}
    assert parse_recipe(data, SOURCE).calibration.samples == 8
    assert parse_recipe(data, SOURCE).calibration.sequence_length == 128


def test_calibration_file_in_recipe_and_with_calib(tmp_path):
    calib = tmp_path / "data" / "chats.jsonl"
    calib.parent.mkdir()
    calib.write_text('[{"role": "user", "content": "hi"}]\n')
    path = tmp_path / "r.yaml"
    path.write_text("schema_version: 2\nname: r\nmodules: {thinker: {weights: int4, method: awq}}\n"
                    "calibration: {source: data/chats.jsonl, samples: 2, sequence_length: 16}\n")
    cal = load_recipe(path).calibration
    assert (cal.source, cal.file, cal.samples) == ("file", calib, 2)
    assert load_recipe(path).to_json()["calibration"]["file"] == "chats.jsonl"
    assert len(load_recipe(path).to_json()["calibration"]["sha256"]) == 64

    cal = load_recipe("awq").with_calibration_file(calib).calibration
    assert (cal.source, cal.file, cal.samples, cal.sequence_length) == ("file", calib, 4, 128)
    with pytest.raises(RecipeError, match="does not calibrate") as info:
        load_recipe("int4-rtn").with_calibration_file(calib)
    assert "--calib" in str(info.value)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("awq").with_calibration_file(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(Exception, match="line 1.*robot"):  # the file's content is checked up front
        load_recipe("awq").with_calibration_file(bad)


# -- invalid recipes: each names the key/value and the choices -------------------------------


@pytest.mark.parametrize(
    "key,value,choices",
    [
        ("weights", "int3", ["float32", "float16", "int4", "int8"]),
        ("weights", 4, ["int4"]),
        ("method", "gptq", ["none", "rtn", "awq"]),
        ("method", None, ["none", "rtn", "awq"]),
        ("group_size", 0, ["multiple of 16"]),
        ("group_size", 15, ["multiple of 16"]),
        ("group_size", 100, ["multiple of 16"]),
        ("group_size", -128, ["multiple of 16"]),
        ("group_size", "128", ["multiple of 16"]),
        ("group_size", True, ["multiple of 16"]),
        ("symmetric", "yes please", ["true | false"]),
        ("symmetric", 1, ["true | false"]),
        ("accuracy_level", 5, ["0 | 1 | 2 | 3 | 4"]),
        ("accuracy_level", "4", ["0 | 1 | 2 | 3 | 4"]),
        ("keep_float", "*.k_proj", ["list of linear names"]),
        ("keep_float", [3], ["list of linear names"]),
        ("lm_head", "float16", ["float32 | int8 | int4"]),
        ("embeddings", "int2", ["float32 | int8 | int4"]),
        ("emit", "qoperator", ["qdq | matmulnbits"]),
    ],
)
def test_bad_module_value(key, value, choices):
    settings = {"weights": "int4", "method": "rtn", key: value}
    rejected(recipe(**settings), f"modules.thinker.{key}", repr(value), *choices)


@pytest.mark.parametrize("group_size", [16, 32, 64, 128, 256])
def test_good_group_sizes(group_size):
    assert parse_recipe(recipe(weights="int4", group_size=group_size), SOURCE).module("thinker").group_size == group_size


def test_unknown_module_and_key():
    data = {"schema_version": 2, "name": "mine", "modules": {"talker9": {}}}
    rejected(data, "'talker9'", "thinker")
    rejected(recipe(weights="int4", turbo=True), "'turbo'", "modules.thinker", *KEYS)
    rejected({**recipe(), "extra": 1}, "'extra'", "schema_version, name, description, modules, calibration")


def test_every_known_module_lists_its_keys():
    for name, module in REGISTRY.items():
        assert set(module.recipe_keys) <= set(KEYS) and module.linears, name


@pytest.mark.parametrize(
    "settings,needles",
    [
        ({"weights": "int4", "method": "none"}, ["weights int4 needs method rtn or awq"]),
        ({"weights": "float32", "method": "awq"}, ["method awq", "float32", "method: none"]),
        ({"weights": "float16", "method": "rtn"}, ["method rtn", "float16"]),
        ({"weights": "int8", "method": "rtn"}, ["int8", "w8a8"]),
        ({"weights": "int4", "keep_float": ["*.k_prj"]}, ["'*.k_prj'", "matches no linear", "self_attn.k_proj"]),
        ({"weights": "int4", "keep_float": ["model.layers.0.mlp.down_proj"]}, ["matches no linear", "mlp.down_proj"]),
    ],
)
def test_inconsistent_module(settings, needles):
    rejected(recipe(**settings), *needles)


@pytest.mark.parametrize(
    "change,needles",
    [
        ({"schema_version": 3}, ["schema_version is 3", "schema_version: 2"]),
        ({"schema_version": "2"}, ["schema_version is '2'"]),
        ({"name": "Bad Name"}, ["'Bad Name'", "[a-z0-9_-]+"]),
        ({"description": ["x"]}, ["description"]),
        ({"modules": {}}, ["modules must be a non-empty mapping", "thinker"]),
        ({"modules": ["thinker"]}, ["modules must be a non-empty mapping", "thinker"]),
        ({"modules": {"thinker": "int4"}}, ["modules.thinker must be a mapping", "weights"]),
        ({"calibration": {"samples": 4}}, ["no module uses method awq", "remove the calibration"]),
    ],
)
def test_bad_recipe(change, needles):
    rejected({**recipe(), **change}, *needles)


@pytest.mark.parametrize(
    "calibration,needles",
    [
        ({"samples": 0}, ["calibration.samples", "0", "positive integer"]),
        ({"sequence_length": 12.5}, ["calibration.sequence_length", "12.5"]),
        ({"size": 3}, ["'size'", "source, samples, sequence_length"]),
        ({"source": 7}, ["calibration.source", "builtin"]),
        ("builtin", ["calibration must be a mapping"]),
        ({"source": "chats.jsonl"}, ["relative path", "--calib"]),  # no folder to resolve against
    ],
)
def test_bad_calibration(calibration, needles):
    rejected({**recipe(weights="int4", method="awq"), "calibration": calibration}, *needles)


def test_missing_keys():
    rejected({"name": "mine", "modules": {"thinker": {}}}, "missing recipe key: schema_version")
    rejected({"schema_version": 2, "modules": {"thinker": {}}}, "missing recipe key: name")
    rejected({"schema_version": 2, "name": "mine"}, "missing recipe key: modules")
    rejected([1, 2], "YAML mapping")


V1 = {"schema_version": 1, "name": "mine", "dtype": "float32", "quantization": None, "components": ["thinker"]}


@pytest.mark.parametrize("data", [V1, {k: v for k, v in V1.items() if k != "schema_version"},
                                  {**V1, "schema_version": 2}])
def test_v1_recipe_gets_conversion(data):
    message = rejected(data, "schema version 1", "schema_version: 2", "modules:")
    # the suggested replacement is valid schema 2 and means the same thing (float32 thinker)
    fix = message.split("`modules: ", 1)[1].split("`", 1)[0]
    converted = {"schema_version": 2, "name": "mine", "modules": yaml.safe_load(fix)}
    t = parse_recipe(converted, SOURCE).module("thinker")
    assert (t.weights, t.method) == ("float32", "none")


def test_v1_builtin_file_shape(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("schema_version: 1\nname: old\ndtype: float32\nquantization: null\ncomponents: [thinker]\n")
    with pytest.raises(RecipeError, match="schema version 1") as info:
        load_recipe(str(path))
    assert info.value.path == str(path)


def test_module_lookup():
    r = load_recipe("fp32")
    with pytest.raises(RecipeError, match="unknown module 'talker9'") as info:
        r.module("talker9")
    assert "thinker" in str(info.value)


def test_unknown_name_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe") as info:
        load_recipe("nope")
    assert "fp32" in str(info.value) and "awq" in str(info.value)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="YAML"):
        load_recipe(str(bad))


def test_recipes_import_is_light():
    code = ("import sys, omni_export.build.recipes as r; r.load_recipe('awq'); "
            "heavy = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- precisions, dtype, keep_fp32, build targets ------------------------------------------------


def test_every_float_module_takes_float16_and_int8():
    data = {"schema_version": 2, "name": "p", "modules": {
        "thinker": {"weights": "float16"}, "audio": {"weights": "int8"}, "vision": {"weights": "float16"},
        "talker": {"weights": "int4"}, "token2wav": {"weights": "int8", "dtype": "float16"}}}
    r = parse_recipe(data, SOURCE)
    assert (r.module("thinker").weights, r.module("thinker").dtype) == ("float16", "float16")
    assert (r.module("audio").dtype, r.module("audio").method) == ("float32", "rtn")
    assert (r.module("talker").weights, r.module("talker").group_size) == ("int4", 128)
    assert r.module("token2wav").float_dtype == "float16"


def test_int4_thinker_with_float16_activations():
    t = parse_recipe(recipe(weights="int4", dtype="float16"), SOURCE).module("thinker")
    assert t.quantized and t.dtype == "float16"


@pytest.mark.parametrize("modules,needles", [
    ({"audio": {"weights": "int4"}}, ["modules.audio.weights", "float32 | float16 | int8"]),
    ({"thinker": {"weights": "int8"}}, ["w8a8"]),
    ({"thinker": {"weights": "float16", "dtype": "float32"}}, ["dtype float32 differs from weights float16"]),
    ({"audio": {"keep_fp32": ["norm"]}}, ["keep_fp32 is set but dtype is float32"]),
    ({"audio": {"weights": "float16", "keep_fp32": ["snake"]}}, ["'snake'", "norm, softmax, residual"]),
    ({"talker": {"weights": "int4", "method": "awq"}}, ["method: awq is not built for the talker"]),
    ({"vision": {"method": "rtn"}}, ["unknown key 'method'"]),
])
def test_precision_errors(modules, needles):
    rejected({"schema_version": 2, "name": "p", "modules": {"thinker": {}, **modules}}, *needles)


@pytest.mark.parametrize("name", ["fp32", "awq", "int4-rtn"])
def test_builtin_recipes_for_cuda(name):
    cpu, cuda = load_recipe(name), load_recipe(name, target="cuda")
    assert cpu.target == "cpu" and cuda.target == "cuda"
    assert {m.dtype for m in cpu.modules.values()} == {"float32"}  # cpu: as before
    assert all(m.weights in ("float32", "int4") for m in cpu.modules.values())
    for module in ("audio", "vision", "talker"):
        assert cuda.module(module).weights == "float16"
    assert cuda.module("thinker").dtype == "float16"
    assert cuda.module("token2wav").weights == ("float16" if name == "fp32" else "int8")
    assert cuda.module("thinker").weights == ("float16" if name == "fp32" else "int4")


def test_targets_section_is_checked_for_every_target():
    data = {"schema_version": 2, "name": "p", "modules": {"thinker": {}},
            "targets": {"cuda": {"modules": {"thinker": {"weights": "float8"}}}}}
    rejected(data, "modules.thinker.weights")  # checked although the cpu target does not use it
    data["targets"] = {"tpu": {"modules": {}}}
    rejected(data, "unknown build target 'tpu'")
    data["targets"] = {"cuda": {"modules": {"audio": {"weights": "float16"}}}}
    rejected(data, "which the recipe's modules do not export")
    with pytest.raises(RecipeError, match="--target"):
        load_recipe("fp32", target="tpu")
