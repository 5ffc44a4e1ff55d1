"""Import of msModelSlim's AscendV1 W8A8 output (``omni_export.checkpoint.modelslim``).

The directory is written by ``omni_export.testkit.modelslim_writer`` (from msModelSlim's source,
not from the importer): the thinker's q/k/v/o/gate/up W8A8_DYNAMIC, lm_head and down_proj FLOAT,
sharded with an index, every key prefixed ``thinker.`` as the Omni adapter leaves it.

- The bundle's int8 weights and float32 scales are the files' bytes (bit for bit), the FLOAT
  linears the files' floats.
- Its decoder computes what a bundle built from the float checkpoint with the same W8A8 recipe
  computes: msModelSlim's symmetric per-channel minmax gives the same levels and scales as
  ``quant.w8a8.quantize_weight`` on these weights, so the outputs are equal exactly.
- ``omni-export verify`` runs against the msModelSlim directory (its reference: the int8
  weights dequantized).
- Static W8A8 (``W8A8``: attention linears with a calibrated per-tensor activation scale and
  offset, ``quant_bias`` int32 and ``deq_scale`` as float32 or as msModelSlim's int64 bit
  pattern): the bundle's int8 weights, quant_bias, deq_scale (as float32), input_scale and
  input_offset are the files' bytes; the manifest lists the static linears; verify agrees.
- A type the importer does not read is an error naming the tensor and the type, before any work.
"""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from safetensors import safe_open

from conftest import run_cli
from omni_export.build.pipeline import build_bundle
from omni_export.checkpoint.reader import Checkpoint, CheckpointError
from omni_export.testkit.modelslim_writer import write_modelslim_checkpoint

SHARD_BYTES = 400_000
QUANTIZED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj")
PACKED = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
          "gate_up": ("mlp.gate_proj", "mlp.up_proj")}


def recipe(tmp_path, **extra):
    data = {"schema_version": 2, "name": "w8a8-import", "modules": {"thinker": {
        "weights": "int8", "activations": "int8_per_token", "method": "rtn", "keep_float": ["*.mlp.down_proj"],
        "lm_head": "float32", "embeddings": "float32", **extra}}}
    path = tmp_path / "w8a8.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def modelslim_dir(tmp_path_factory):
    return write_modelslim_checkpoint(tmp_path_factory.mktemp("modelslim") / "ms", seed=0, part_bytes=SHARD_BYTES)


@pytest.fixture(scope="module")
def imported(modelslim_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("imported")
    return build_bundle(modelslim_dir, recipe(base), base / "bundle")


def file_tensors(root):
    """Every tensor of msModelSlim's weight files, as stored."""
    index = json.loads((root / "quant_model_weights.safetensors.index.json").read_text())
    out = {}
    for file in sorted(set(index.values())):
        with safe_open(str(root / file), framework="numpy") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_writer_layout(modelslim_dir):
    desc = json.loads((modelslim_dir / "quant_model_description.json").read_text())
    assert desc["thinker.version"] == "1.0.0" and desc["thinker.model_quant_type"] == "W8A8_DYNAMIC"
    assert desc["thinker.model.layers.0.self_attn.q_proj.weight"] == "W8A8_DYNAMIC"
    assert desc["thinker.model.layers.0.self_attn.q_proj.bias"] == "FLOAT"
    assert desc["thinker.model.layers.0.mlp.down_proj.weight"] == "FLOAT"
    assert desc["thinker.lm_head.weight"] == "FLOAT"
    index = json.loads((modelslim_dir / "quant_model_weights.safetensors.index.json").read_text())
    assert "weight_map" not in index and len(set(index.values())) > 1  # the Omni post-processing's bare map
    assert set(index) == {k for k in desc if not k.split(".", 1)[1] in
                          ("version", "model_quant_type", "group_size", "metadata", "optional")}
    tensors = file_tensors(modelslim_dir)
    q = tensors["thinker.model.layers.0.self_attn.q_proj.weight"]
    scale = tensors["thinker.model.layers.0.self_attn.q_proj.weight_scale"]
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (q.shape[0], 1)
    assert not tensors["thinker.model.layers.0.self_attn.q_proj.weight_offset"].any()
    assert "quantization_config" not in json.loads((modelslim_dir / "config.json").read_text())
    with safe_open(str(modelslim_dir / "model.safetensors"), framework="numpy") as f:
        assert not any(k.startswith("thinker.") for k in f.keys())  # the float talker / token2wav only
    assert Checkpoint.open(modelslim_dir).modelslim.model_quant_type == "W8A8_DYNAMIC"


def test_import_is_bit_identical(imported, modelslim_dir):
    tensors = file_tensors(modelslim_dir)
    model = onnx.load(str(imported / "thinker_decoder.onnx"))
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    layers = json.loads((imported / "manifest.json").read_text())["config"]["thinker"]["num_hidden_layers"]
    checked = 0
    for i in range(layers):
        for paths in PACKED.values():
            name = "+".join(f"layers.{i}.{p}" for p in paths)
            levels = init[f"{name}.qweight"].T  # [N, K] rows of the packed linears
            scales = init[f"{name}.weight_scale"]
            start = 0
            for p in paths:
                q = tensors[f"thinker.model.layers.{i}.{p}.weight"]
                s = tensors[f"thinker.model.layers.{i}.{p}.weight_scale"].reshape(-1)
                n = q.shape[0]
                assert levels.dtype == np.int8 and np.array_equal(levels[start:start + n], q)
                assert np.array_equal(scales[start:start + n].view(np.uint32), s.view(np.uint32))
                start += n
                checked += 1
            assert start == levels.shape[0]
        down = init[f"layers.{i}.mlp.down_proj.weight"].T
        assert np.array_equal(down, tensors[f"thinker.model.layers.{i}.mlp.down_proj.weight"])
    assert checked == len(QUANTIZED) * layers
    quant = json.loads((imported / "manifest.json").read_text())["graphs"]["thinker_decoder"]["quantization"]
    assert quant["method"] == "modelslim" and quant["activations"] == "int8_per_token"
    assert quant["source"] == {"format": "msmodelslim-ascendv1", "model_quant_type": "W8A8_DYNAMIC",
                               "version": "1.0.0"}
    assert quant["keep_float"] == [f"layers.{i}.mlp.down_proj" for i in range(layers)]


def decoder_outputs(bundle, length=12):
    cfg = json.loads((bundle / "manifest.json").read_text())["config"]["thinker"]
    ids = np.random.default_rng(length).integers(0, 151000, size=(1, length)).astype(np.int64)
    run = lambda g, feeds: ort.InferenceSession(str(bundle / g), providers=["CPUExecutionProvider"]).run(None, feeds)
    embeds = run("thinker_embedding.onnx", {"input_ids": ids})[0]
    feeds = {"inputs_embeds": embeds, "position_ids": np.broadcast_to(np.arange(length), (3, 1, length)).copy(),
             "seqlens_k": np.array([length - 1], np.int32), "total_sequence_length": np.array(length, np.int32)}
    for i in range(cfg["num_hidden_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_dim"]),
                                                            np.float32)
    return run("thinker_decoder.onnx", feeds)[:2]


def test_import_computes_the_w8a8_recipe_of_the_float_model(imported, tiny_checkpoint, tmp_path):
    """Same seed, same weights: msModelSlim's levels and scales are the w8a8 recipe's, so the outputs are equal."""
    ours = build_bundle(tiny_checkpoint, recipe(tmp_path), tmp_path / "ours")
    for a, b in zip(decoder_outputs(imported), decoder_outputs(ours)):
        assert np.array_equal(a, b)


def test_verify_against_the_modelslim_directory(imported, modelslim_dir):
    from omni_export.verify.driver import verify_bundle

    report = verify_bundle(imported, modelslim_dir, prompts=2, tokens=8)
    decoder = report["graphs"]["thinker_decoder"]
    assert 0 < decoder["rel_rms"] <= 0.03  # the activations' int8 rounding only (weights: dequantized reference)
    assert report["thinker"]["top1_agreement"] >= 0.75


@pytest.mark.parametrize("kind", ["W8A8_MIX", "W4A8_DYNAMIC", "W8A16"])
def test_unsupported_type_names_the_tensor(modelslim_dir, tmp_path, kind):
    copy = tmp_path / "ms"
    shutil.copytree(modelslim_dir, copy)
    path = copy / "quant_model_description.json"
    desc = json.loads(path.read_text())
    name = "thinker.model.layers.1.self_attn.o_proj.weight"
    desc[name] = kind
    path.write_text(json.dumps(desc))
    with pytest.raises(CheckpointError) as info:
        build_bundle(copy, recipe(tmp_path), tmp_path / "bundle")
    assert name in str(info.value) and kind in str(info.value)
    assert not (tmp_path / "bundle").exists()


def test_single_file_layout_and_float_recipe(tmp_path):
    root = write_modelslim_checkpoint(tmp_path / "single", seed=1, part_bytes=0)
    assert (root / "quant_model_weights.safetensors").is_file()
    assert not (root / "quant_model_weights.safetensors.index.json").exists()
    w8a8 = build_bundle(root, recipe(tmp_path), tmp_path / "w8a8")
    fp32 = build_bundle(root, "fp32", tmp_path / "fp32")  # the int8 linears dequantized
    assert json.loads((fp32 / "manifest.json").read_text())["graphs"]["thinker_decoder"]["quantization"] is None
    for a, b in zip(decoder_outputs(w8a8), decoder_outputs(fp32)):  # logits, hidden states
        assert 0 < np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)) <= 0.03


def test_missing_shard_is_a_clear_error(modelslim_dir, tmp_path):
    copy = tmp_path / "ms"
    shutil.copytree(modelslim_dir, copy)
    next(copy.glob("quant_model_weights-00001-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard listed in the index is missing"):
        Checkpoint.open(copy)


def test_cli_tiny_writes_modelslim(tmp_path):
    out = tmp_path / "cli"
    result = run_cli("tiny", str(out), "--w8a8-modelslim")
    assert result.returncode == 0, result.stderr
    assert (out / "quant_model_description.json").is_file() and (out / "quant_model_weights.safetensors").is_file()


STATIC = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


@pytest.fixture(scope="module", params=[True, False], ids=["deq-int64", "deq-float32"])
def static_import(request, tmp_path_factory):
    base = tmp_path_factory.mktemp("static")
    root = write_modelslim_checkpoint(base / "ms", seed=0, part_bytes=SHARD_BYTES,
                                      static=("model.layers.*.self_attn.*",), deq_int64=request.param)
    return root, build_bundle(root, recipe(base), base / "bundle"), request.param


def test_static_import_is_bit_identical(static_import):
    root, bundle, deq_int64 = static_import
    tensors = file_tensors(root)
    desc = json.loads((root / "quant_model_description.json").read_text())
    assert desc["thinker.model_quant_type"] == "W8A8"  # W8A8 outranks W8A8_DYNAMIC (QUANT_TYPE_PRIORITY)
    assert desc["thinker.model.layers.0.self_attn.q_proj.deq_scale"] == "W8A8"
    assert desc["thinker.model.layers.0.mlp.gate_proj.weight"] == "W8A8_DYNAMIC"
    init = {i.name: onnx.numpy_helper.to_array(i)
            for i in onnx.load(str(bundle / "thinker_decoder.onnx")).graph.initializer}
    layers = json.loads((bundle / "manifest.json").read_text())["config"]["thinker"]["num_hidden_layers"]
    for i in range(layers):
        for paths in (STATIC[:3], STATIC[3:]):
            name = "+".join(f"layers.{i}.{p}" for p in paths)
            start = 0
            for p in paths:
                stored = {part: tensors[f"thinker.model.layers.{i}.{p}.{part}"]
                          for part in ("weight", "quant_bias", "deq_scale", "input_scale", "input_offset")}
                assert stored["deq_scale"].dtype == (np.int64 if deq_int64 else np.float32)
                deq = stored["deq_scale"].astype(np.int32).view(np.float32) if deq_int64 else stored["deq_scale"]
                n = stored["weight"].shape[0]
                assert np.array_equal(init[f"{name}.qweight"].T[start:start + n], stored["weight"])
                assert init[f"{name}.quant_bias"].dtype == np.int32
                assert np.array_equal(init[f"{name}.quant_bias"][start:start + n], stored["quant_bias"])
                assert init[f"{name}.deq_scale"][start:start + n].tobytes() == deq.tobytes()
                # q/k/v read one input: msModelSlim calibrated the same range, so one scale and offset
                assert init[f"{name}.input_scale"].tobytes() == stored["input_scale"].tobytes()
                assert init[f"{name}.input_offset"].tobytes() == stored["input_offset"].tobytes()
                start += n
            assert start == init[f"{name}.qweight"].shape[1]
        assert f"layers.{i}.self_attn.q_proj.bias" not in init  # carried by quant_bias
    quant = json.loads((bundle / "manifest.json").read_text())["graphs"]["thinker_decoder"]["quantization"]
    assert quant["static_activations"] == [f"layers.{i}.{p}" for i in range(layers) for p in STATIC]
    assert quant["source"]["model_quant_type"] == "W8A8"


def test_static_import_verifies(static_import):
    from omni_export.verify.driver import verify_bundle

    root, bundle, _ = static_import
    report = verify_bundle(bundle, root, prompts=2, tokens=8)
    assert 0 < report["graphs"]["thinker_decoder"]["rel_rms"] <= 0.03
    assert report["thinker"]["top1_agreement"] >= 0.75
    result = run_cli("run", str(bundle), "--prompt", "hello", "--greedy", "--max-new-tokens", "4", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) == 4


def test_static_linear_missing_a_part_is_a_clear_error(static_import, tmp_path):
    root, _, _ = static_import
    copy = tmp_path / "ms"
    shutil.copytree(root, copy)
    path = copy / "quant_model_description.json"
    desc = json.loads(path.read_text())
    name = "thinker.model.layers.1.mlp.up_proj.weight"  # a W8A8_DYNAMIC linear re-typed static: no quant_bias
    desc[name] = "W8A8"
    path.write_text(json.dumps(desc))
    with pytest.raises(CheckpointError, match="layers.1.mlp.up_proj has no quant_bias"):
        build_bundle(copy, recipe(tmp_path), tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
