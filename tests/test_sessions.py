"""Provider selection (with fake provider lists) and the SessionPool on a tiny ONNX graph."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import onnx
import onnx.helper as helper
import onnx.numpy_helper
import pytest

import omni_runtime.bundle.sessions as sessions
from omni_runtime import load_manifest
from omni_runtime.errors import BundleError, InputError, OmniError
from omni_runtime.bundle.manifest import MANIFEST_NAME, SCHEMA, SCHEMA_VERSION
from omni_runtime.bundle.sessions import (
    CPU,
    CUDA,
    SessionPool,
    SessionSettings,
    available_providers,
    io_binding_enabled,
    select_providers,
)

GRAPH_IO = {
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]},
               {"name": "ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 4]},
                {"name": "n", "dtype": "int64", "shape": ["batch"]}],
}
WEIGHT = np.arange(4, dtype=np.float32)


def write_graph(root):
    """``y = x + WEIGHT`` (weight in external data) and ``n = ReduceSum(ids, axis 1)``."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"]),
         helper.make_node("Constant", [], ["axes"], value=onnx.numpy_helper.from_array(np.array([1], np.int64))),
         helper.make_node("ReduceSum", ["ids", "axes"], ["n"], keepdims=0)],
        "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("n", onnx.TensorProto.INT64, ["batch"])],
        [onnx.numpy_helper.from_array(WEIGHT, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save_model(model, root / "tiny.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="tiny.onnx.data", size_threshold=0)


def make_bundle(root, io=GRAPH_IO):
    """A complete bundle with the tiny graph as ``tiny`` (I/O as declared by ``io``)."""
    root.mkdir()
    write_graph(root)
    (root / "tokenizer.json").write_text("{}")
    (root / "chat_template.jinja").write_text("{{ messages }}")
    files = {}
    for path in sorted(root.iterdir()):
        data = path.read_bytes()
        files[path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    body = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "producer": {"name": "omni-export", "version": "0.1.0"},
        "model": {"family": "qwen2_5_omni", "source": "tiny", "architectures": []},
        "recipe": {"name": "fp32"},
        "files": files,
        "tokenizer": {"file": "tokenizer.json", "chat_template_file": "chat_template.jinja",
                      "default_system_prompt": ""},
        "special_tokens": {name: i for i, name in enumerate(
            ["endoftext", "im_start", "im_end", "audio", "audio_bos", "audio_eos", "vision_bos", "vision_eos",
             "image", "video", "pad"])},
        "generation": {"eos_token_ids": [2], "pad_token_id": 0, "do_sample": False, "temperature": 1.0,
                       "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "max_new_tokens": 8},
        "config": {"thinker": {"hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1,
                               "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 8, "rms_norm_eps": 1e-6,
                               "rope_theta": 10000.0, "mrope_section": [1, 1, 0], "max_position_embeddings": 64,
                               "kv_dtype": "float32"}},
        "graphs": {"tiny": {"file": "tiny.onnx", "external_data": ["tiny.onnx.data"], "opset": 18,
                            "dtype": "float32", "quantization": None, **io}},
    }
    (root / MANIFEST_NAME).write_text(json.dumps(body))
    return root


@pytest.fixture
def manifest(tmp_path):
    return load_manifest(make_bundle(tmp_path / "bundle"))


@pytest.mark.parametrize(
    "device, available, expected",
    [
        ("auto", [CUDA, CPU], [CUDA, CPU]),
        ("auto", ["TensorrtExecutionProvider", CPU, CUDA], [CUDA, CPU]),
        ("auto", [CPU], [CPU]),
        ("auto", ["AzureExecutionProvider", CPU], [CPU]),
        ("cpu", [CUDA, CPU], [CPU]),
        ("cpu", [CPU], [CPU]),
        ("cuda", [CUDA, CPU], [CUDA, CPU]),
    ],
)
def test_select_providers(device, available, expected):
    assert select_providers(device, available) == expected


def test_cuda_unavailable():
    with pytest.raises(InputError) as info:
        select_providers("cuda", [CPU])
    assert "pip install omni-runtime[gpu]" in str(info.value)
    assert CPU in str(info.value)


def test_unknown_device():
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        select_providers("tpu", [CPU])


def test_real_providers():
    assert CPU in available_providers()
    assert select_providers("cpu") == [CPU]
    assert select_providers("auto")[-1] == CPU


@pytest.mark.parametrize(
    "providers, expected",
    [([CUDA, CPU], True), ([CPU], False), ([], False), ([CPU, CUDA], False)],
)
def test_io_binding_enabled(providers, expected):
    assert io_binding_enabled(providers) is expected


def test_missing_onnxruntime(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(OmniError) as info:
        available_providers()
    assert "pip install omni-runtime[cpu]" in str(info.value) and "[gpu]" in str(info.value)


def test_lazy_load_and_run(manifest):
    pool = SessionPool(manifest, [CPU], SessionSettings(intra_op_threads=1))
    assert pool.loaded == {} and pool.loaded_bytes == 0
    session = pool.get("tiny")
    x = np.ones((2, 4), np.float32)
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    y, n = session.run(["y", "n"], {"x": x, "ids": ids})
    np.testing.assert_array_equal(y, x + WEIGHT)
    np.testing.assert_array_equal(n, [6, 15])
    assert pool.get("tiny") is session
    assert manifest.files["tiny.onnx.data"]["bytes"] == WEIGHT.nbytes  # the weight really is external
    size = manifest.files["tiny.onnx"]["bytes"] + manifest.files["tiny.onnx.data"]["bytes"]
    assert pool.loaded == {"tiny": size} and pool.loaded_bytes == size


def test_verified_once(manifest, monkeypatch):
    checked = []
    real = sessions.verify_file
    monkeypatch.setattr(sessions, "verify_file", lambda m, rel: (checked.append(rel), real(m, rel)))
    pool = SessionPool(manifest, [CPU])
    pool.get("tiny")
    pool.release("tiny")
    pool.get("tiny")
    assert checked == ["tiny.onnx", "tiny.onnx.data"]


@pytest.mark.parametrize("relpath", ["tiny.onnx.data", "tiny.onnx"])
def test_corruption_detected_before_load(manifest, monkeypatch, relpath):
    path = manifest.root / relpath
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))

    def no_onnxruntime():
        raise AssertionError("onnxruntime must not be touched before the hashes are checked")

    monkeypatch.setattr(sessions, "import_onnxruntime", no_onnxruntime)
    pool = SessionPool(manifest, [CPU])
    with pytest.raises(BundleError) as info:
        pool.get("tiny")
    assert "corrupt: sha256 mismatch" in str(info.value)
    assert str(path) in str(info.value) and "fix:" in str(info.value)
    assert pool.loaded == {}


@pytest.mark.parametrize(
    "io, needle",
    [
        ({**GRAPH_IO, "inputs": [GRAPH_IO["inputs"][0]]}, "unexpected input 'ids'"),
        ({**GRAPH_IO, "outputs": [*GRAPH_IO["outputs"], {"name": "z", "dtype": "float32", "shape": [1]}]},
         "the manifest's output 'z' is missing"),
        ({**GRAPH_IO, "inputs": [{"name": "x", "dtype": "float16", "shape": ["batch", 4]}, GRAPH_IO["inputs"][1]]},
         "input 'x' is float32, the manifest says float16"),
        ({**GRAPH_IO, "outputs": [GRAPH_IO["outputs"][0], {"name": "n", "dtype": "int32", "shape": ["batch"]}]},
         "output 'n' is int64, the manifest says int32"),
    ],
)
def test_io_mismatch_rejected(tmp_path, io, needle):
    manifest = load_manifest(make_bundle(tmp_path / "bundle", io))
    pool = SessionPool(manifest, [CPU])
    with pytest.raises(BundleError) as info:
        pool.get("tiny")
    message = str(info.value)
    assert needle in message and "graph 'tiny' does not match the manifest" in message
    assert message.startswith(str(manifest.root / "tiny.onnx")) and "fix:" in message
    assert pool.loaded == {}


def test_release_frees(manifest):
    pool = SessionPool(manifest, [CPU])
    first = pool.get("tiny")
    pool.release("tiny")
    assert pool.loaded == {} and pool.loaded_bytes == 0
    pool.release("tiny")  # releasing an unloaded graph is a no-op
    second = pool.get("tiny")
    assert second is not first
    pool.release_all()
    assert pool.loaded == {}
    assert pool.get("tiny") is not second


def test_unknown_graph(manifest):
    with pytest.raises(BundleError, match="no graph 'talker'"):
        SessionPool(manifest, [CPU]).get("talker")


def test_bad_optimization_level(manifest):
    with pytest.raises(InputError, match="optimization level"):
        SessionPool(manifest, [CPU], SessionSettings(optimization="max")).get("tiny")


def test_unloadable_graph(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "tiny.onnx.data").write_bytes(b"")  # consistent with the manifest, but the weight is gone
    body = json.loads((bundle / MANIFEST_NAME).read_text())
    body["files"]["tiny.onnx.data"] = {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    (bundle / MANIFEST_NAME).write_text(json.dumps(body))
    manifest = load_manifest(bundle)
    with pytest.raises(BundleError, match="cannot load graph 'tiny'") as info:
        SessionPool(manifest, [CPU]).get("tiny")
    assert str(bundle.resolve() / "tiny.onnx") in str(info.value)


def test_dtype_names_agree_with_manifest():
    from omni_runtime.bundle.manifest import TENSOR_DTYPES

    assert set(sessions.ORT_DTYPES.values()) == TENSOR_DTYPES


def test_accuracy_level_from_manifest_reaches_session_options():
    from omni_runtime.bundle.manifest import GraphSpec
    from omni_runtime.bundle.sessions import graph_session_config

    def spec(quantization):
        return GraphSpec("g", "g.onnx", (), 21, "float32", quantization, (), ())

    assert graph_session_config(spec({"weights": "int4", "accuracy_level": 4})) == {
        "session.qdq_matmulnbits_accuracy_level": "4"}
    assert graph_session_config(spec({"weights": "int4", "accuracy_level": 0})) == {
        "session.qdq_matmulnbits_accuracy_level": "0"}
    assert graph_session_config(spec(None)) == {}
    assert graph_session_config(spec({"accuracy_level": "4"})) == {}  # not an int: ignored, not trusted
